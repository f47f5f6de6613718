// Per-sample Conv2d weight gradient on the CPU, without an unfold buffer.
//
// Two paths, both without any N-sized buffer: stride 1 (the NB201/ResNet 3x3 and padded
// 1x1 convs) reads patches as shifted rows of a zero-padded copy of each input plane
// (conv_psg_shifted, below); strided convs, and 1x1 without padding, use the row-chunk
// im2col described next (conv_psg_impl).
//
// For sample n and group g:  G[n, g]^T (D x C_out/g) = U (D x T) . gout[n, g]^T (T x C_out/g),
// U the im2col patches of x[n, g], D = C_in/g * kh * kw, T = oH * oW.
// U is built a few output rows at a time (contiguous row copies) into a per-thread scratch
// of D x ~256 values (never the N x D x T unfold tensor), gout's chunk is transposed into a
// T x C_out/g panel zero-padded to a multiple of 16 columns, and the outer-product GEMM of
// tile.h accumulates G^T in registers over the whole chunk (a short K = T needs no horizontal
// sums, which the dot-product tile used for the Gram ends every call with). OpenMP over
// (sample, group) items; only the diagonal group blocks are computed (no groups^2 waste for
// depthwise). bench/bench_conv_psg.py times this op against unfold+bmm and a grouped conv
// (bench/results/conv_psg_cpu_t*.md); against the engine's own strategies (python
// bench/bench_engine_choices.py conv, bench/results/engine_choices_cpu.md) it is the
// fastest at no measured shape, so method="auto" does not use it; method="csrc" does.
#include <omp.h>

#include <algorithm>
#include <vector>

#include <ATen/ops/empty.h>

#include "fastntk.h"
#include "tile.h"

namespace fastntk {
namespace {

FASTNTK_CLONES void outer_f32(const float* A, int64_t lda, int64_t M, const float* B,
                              int64_t ldb, int64_t N, int64_t K, float* C, int64_t ldc) {
  detail::outer_gemm<float>(A, lda, M, B, ldb, N, K, C, ldc);
}
FASTNTK_CLONES void outer_f64(const double* A, int64_t lda, int64_t M, const double* B,
                              int64_t ldb, int64_t N, int64_t K, double* C, int64_t ldc) {
  detail::outer_gemm<double>(A, lda, M, B, ldb, N, K, C, ldc);
}
FASTNTK_CLONES void outer_rows_f32(const float* const* A, int64_t koff, int64_t M,
                                   const float* B, int64_t ldb, int64_t N, int64_t K, float* C,
                                   int64_t ldc) {
  detail::outer_gemm_rows<float>(A, koff, M, B, ldb, N, K, C, ldc);
}
FASTNTK_CLONES void outer_rows_f64(const double* const* A, int64_t koff, int64_t M,
                                   const double* B, int64_t ldb, int64_t N, int64_t K, double* C,
                                   int64_t ldc) {
  detail::outer_gemm_rows<double>(A, koff, M, B, ldb, N, K, C, ldc);
}
inline void outer_rows(const float* const* A, int64_t koff, int64_t M, const float* B,
                       int64_t ldb, int64_t N, int64_t K, float* C, int64_t ldc) {
  outer_rows_f32(A, koff, M, B, ldb, N, K, C, ldc);
}
inline void outer_rows(const double* const* A, int64_t koff, int64_t M, const double* B,
                       int64_t ldb, int64_t N, int64_t K, double* C, int64_t ldc) {
  outer_rows_f64(A, koff, M, B, ldb, N, K, C, ldc);
}
inline void outer(const float* A, int64_t lda, int64_t M, const float* B, int64_t ldb, int64_t N,
                  int64_t K, float* C, int64_t ldc) {
  outer_f32(A, lda, M, B, ldb, N, K, C, ldc);
}
inline void outer(const double* A, int64_t lda, int64_t M, const double* B, int64_t ldb,
                  int64_t N, int64_t K, double* C, int64_t ldc) {
  outer_f64(A, lda, M, B, ldb, N, K, C, ldc);
}

// U (D x len) = the patches of output rows [oy0, oy0 + ny) of one (sample, group).
// no-tree-loop-distribute-patterns: keep the short row copies as inline loops instead of
// memcpy/memset calls (rows are 8 values long at NB201's last stage: a library call per row
// costs more than the copy).
template <typename T>
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void build_patches(
    const T* xs, T* U, const ConvGeom& g, int64_t cin_g, int64_t oy0, int64_t ny) {
  const int64_t len = ny * g.oW;
  for (int64_t ci = 0; ci < cin_g; ++ci) {
    const T* xc = xs + ci * g.H * g.W;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        T* row = U + ((ci * g.kh + ky) * g.kw + kx) * len;
        const int64_t xoff = kx * g.dw - g.pw;
        // valid ox: 0 <= ox*sw + xoff < W
        int64_t lo = xoff >= 0 ? 0 : (-xoff + g.sw - 1) / g.sw;
        int64_t hi = g.W - xoff <= 0 ? 0 : (g.W - xoff + g.sw - 1) / g.sw;
        lo = lo < g.oW ? lo : g.oW;
        hi = hi < g.oW ? hi : g.oW;
        hi = hi > lo ? hi : lo;
        for (int64_t yy = 0; yy < ny; ++yy) {
          T* dst = row + yy * g.oW;
          const int64_t iy = (oy0 + yy) * g.sh - g.ph + ky * g.dh;
          if (iy < 0 || iy >= g.H) {
            for (int64_t ox = 0; ox < g.oW; ++ox) dst[ox] = T(0);
            continue;
          }
          const T* src = xc + iy * g.W + xoff;
          for (int64_t ox = 0; ox < lo; ++ox) dst[ox] = T(0);
          if (g.sw == 1) {
            for (int64_t ox = lo; ox < hi; ++ox) dst[ox] = src[ox];
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) dst[ox] = src[ox * g.sw];
          }
          for (int64_t ox = hi; ox < g.oW; ++ox) dst[ox] = T(0);
        }
      }
    }
  }
}

// Stride 1: output position (oy, ox) reads xpad[ci, oy + ky*dh, ox + kx*dw]. Index positions
// by t' = oy*Wp + ox over the padded width Wp: then the patch row of (ci, ky, kx) is the
// padded plane itself from offset ky*dh*Wp + kx*dw, and the Wp - oW junk positions per row
// get zero weight (their gout rows are zero; so a NaN/Inf of x there still reaches weights
// that do not read it, as 0*Inf: non-finite inputs give non-finite gradients beyond PyTorch's,
// and the engine refuses a non-finite kernel). No im2col at all; the padded copy costs
// C_in*Hp*Wp per sample instead of D*T (k*k times fewer values written for a k x k kernel;
// the saving is in the larger maps).
template <typename T>
void conv_psg_shifted(const T* x, const T* gout, T* out, const ConvGeom& g) {
  const int64_t cin_g = g.C_in / g.groups, cout_g = g.C_out / g.groups;
  const int64_t khw = g.kh * g.kw, D = cin_g * khw, T_ = g.oH * g.oW;
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(g.oH, 256 / Wp));
  const int64_t items = g.N * g.groups;
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(items)));
  constexpr int64_t NB = 2 * detail::VecTraits<T, T>::W;
  const int64_t ldg = (cout_g + NB - 1) / NB * NB;
  // Each thread's buffers, allocated here: an allocation failure inside the parallel region
  // cannot propagate (std::terminate); here it is an exception the caller sees.
  std::vector<std::vector<T>> xps(nthreads), gTs(nthreads), accs(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    xps[t].assign(static_cast<size_t>(cin_g * Hp * Wp), T(0));  // borders stay 0
    gTs[t].assign(static_cast<size_t>(rows * Wp * ldg), T(0));  // junk/pad stay 0
    accs[t].resize(static_cast<size_t>(D * ldg));
  }
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T>& xp = xps[omp_get_thread_num()];
    std::vector<T>& gT = gTs[omp_get_thread_num()];
    std::vector<T>& acc = accs[omp_get_thread_num()];
    std::vector<const T*> arow(static_cast<size_t>(D));
    for (int64_t ci = 0; ci < cin_g; ++ci)
      for (int64_t ky = 0; ky < g.kh; ++ky)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          arow[(ci * g.kh + ky) * g.kw + kx] = xp.data() + ci * Hp * Wp + ky * g.dh * Wp + kx * g.dw;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / g.groups, grp = it % g.groups;
      T* G = out + (n * g.C_out + grp * cout_g) * D;
      std::fill(acc.begin(), acc.end(), T(0));
      const T* xs = x + (n * g.C_in + grp * cin_g) * g.H * g.W;
      const T* gs = gout + (n * g.C_out + grp * cout_g) * T_;
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t y = 0; y < g.H; ++y) {
          const T* src = xs + (ci * g.H + y) * g.W;
          T* dst = xp.data() + (ci * Hp + y + g.ph) * Wp + g.pw;
          for (int64_t xx = 0; xx < g.W; ++xx) dst[xx] = src[xx];
        }
      for (int64_t oy0 = 0; oy0 < g.oH; oy0 += rows) {
        const int64_t ny = std::min(rows, g.oH - oy0);
        for (int64_t co = 0; co < cout_g; ++co) {
          for (int64_t yy = 0; yy < ny; ++yy) {
            const T* src = gs + co * T_ + (oy0 + yy) * g.oW;
            T* dst = gT.data() + yy * Wp * ldg + co;
            for (int64_t ox = 0; ox < g.oW; ++ox) dst[ox * ldg] = src[ox];
          }
        }
        const int64_t K = (ny - 1) * Wp + g.oW;
        outer_rows(arow.data(), oy0 * Wp, D, gT.data(), ldg, ldg, K, acc.data(), ldg);
      }
      for (int64_t co = 0; co < cout_g; ++co)
        for (int64_t d = 0; d < D; ++d) G[co * D + d] = acc[d * ldg + co];
    }
  }
}

template <typename T>
void conv_psg_impl(const T* x, const T* gout, T* out, const ConvGeom& g) {
  const int64_t cin_g = g.C_in / g.groups, cout_g = g.C_out / g.groups;
  const int64_t khw = g.kh * g.kw, D = cin_g * khw, T_ = g.oH * g.oW;
  // Output rows per chunk: ~256 positions, so U is at most D x 256 (576 x 256 floats at
  // C_in = 64, 3x3) and stays in L2 while all C_out/g rows of gout stream past it.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(g.oH, 256 / std::max<int64_t>(1, g.oW)));
  const int64_t items = g.N * g.groups;
  const bool direct = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(items)));
  constexpr int64_t NB = 2 * detail::VecTraits<T, T>::W;
  const int64_t ldg = (cout_g + NB - 1) / NB * NB;
  std::vector<std::vector<T>> Us(nthreads), gTs(nthreads), accs(nthreads);  // (as above)
  for (int t = 0; t < nthreads; ++t) {
    Us[t].resize(static_cast<size_t>(D * rows * g.oW));
    gTs[t].assign(static_cast<size_t>(rows * g.oW * ldg), T(0));  // pad columns stay 0
    accs[t].resize(static_cast<size_t>(D * ldg));
  }
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T>& U = Us[omp_get_thread_num()];
    std::vector<T>& gT = gTs[omp_get_thread_num()];
    std::vector<T>& acc = accs[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / g.groups, grp = it % g.groups;
      T* G = out + (n * g.C_out + grp * cout_g) * D;  // (cout_g, D), contiguous
      std::fill(acc.begin(), acc.end(), T(0));
      const T* xs = x + (n * g.C_in + grp * cin_g) * g.H * g.W;
      const T* gs = gout + (n * g.C_out + grp * cout_g) * T_;
      for (int64_t oy0 = 0; oy0 < g.oH; oy0 += rows) {
        const int64_t ny = std::min(rows, g.oH - oy0), len = ny * g.oW;
        for (int64_t co = 0; co < cout_g; ++co) {
          const T* src = gs + co * T_ + oy0 * g.oW;
          for (int64_t t = 0; t < len; ++t) gT[t * ldg + co] = src[t];
        }
        if (direct) {  // 1x1, stride 1, no padding: the patches are x's rows themselves
          outer(xs + oy0 * g.oW, g.H * g.W, D, gT.data(), ldg, ldg, len, acc.data(), ldg);
          continue;
        }
        build_patches(xs, U.data(), g, cin_g, oy0, ny);
        outer(U.data(), len, D, gT.data(), ldg, ldg, len, acc.data(), ldg);
      }
      for (int64_t co = 0; co < cout_g; ++co)
        for (int64_t d = 0; d < D; ++d) G[co * D + d] = acc[d * ldg + co];
    }
  }
}

}  // namespace

ConvGeom conv_geom_checked(const at::Tensor& x, const at::Tensor& gout, int64_t kh, int64_t kw,
                           int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                           int64_t dw, int64_t groups, c10::DeviceType device) {
  const char* where = device == c10::DeviceType::CUDA ? "CUDA" : "CPU";
  TORCH_CHECK(x.device().type() == device && gout.device() == x.device(),
              "fastntk.conv2d_psg: x and gout must be ", where, " tensors on one device, got ",
              x.device(), " and ", gout.device());
  TORCH_CHECK(x.dim() == 4, "fastntk.conv2d_psg: x must be (N, C_in, H, W), got ", x.sizes());
  TORCH_CHECK(gout.dim() == 4, "fastntk.conv2d_psg: gout must be (N, C_out, oH, oW), got ",
              gout.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastntk.conv2d_psg: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(gout.scalar_type() == x.scalar_type(), "fastntk.conv2d_psg: gout dtype ",
              gout.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && gout.is_contiguous(),
              "fastntk.conv2d_psg: x and gout must be contiguous (call .contiguous())");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1,
              "fastntk.conv2d_psg: kernel size, stride and dilation must be >= 1");
  TORCH_CHECK(ph >= 0 && pw >= 0, "fastntk.conv2d_psg: padding must be >= 0");
  // (bounds that keep the size arithmetic below in int64: H + 2*ph, dh*(kh - 1), ...)
  constexpr int64_t kMax = int64_t{1} << 31;
  TORCH_CHECK(kh <= kMax && kw <= kMax && sh <= kMax && sw <= kMax && dh <= kMax && dw <= kMax &&
                  ph <= kMax && pw <= kMax && x.size(2) <= kMax && x.size(3) <= kMax,
              "fastntk.conv2d_psg: kernel size, stride, dilation, padding and input size must "
              "be <= 2**31");
  TORCH_CHECK(x.size(2) + 2 * ph >= dh * (kh - 1) + 1 && x.size(3) + 2 * pw >= dw * (kw - 1) + 1,
              "fastntk.conv2d_psg: the (dilated) kernel is larger than the padded input (",
              x.size(2) + 2 * ph, ", ", x.size(3) + 2 * pw, "), as torch.nn.functional.conv2d "
              "refuses");
  ConvGeom g{x.size(0), x.size(1), x.size(2), x.size(3), gout.size(1), gout.size(2),
             gout.size(3), kh, kw, sh, sw, ph, pw, dh, dw, groups};
  TORCH_CHECK(gout.size(0) == g.N, "fastntk.conv2d_psg: batch sizes differ (", g.N, ", ",
              gout.size(0), ")");
  TORCH_CHECK(groups >= 1 && g.C_in % groups == 0 && g.C_out % groups == 0,
              "fastntk.conv2d_psg: groups=", groups, " must divide C_in=", g.C_in,
              " and C_out=", g.C_out);
  const int64_t eh = (g.H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t ew = (g.W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.oH == eh && g.oW == ew, "fastntk.conv2d_psg: gout spatial size (", g.oH, ", ",
              g.oW, ") does not match the conv output (", eh, ", ", ew, ")");
  return g;
}

at::Tensor conv2d_psg(const at::Tensor& x, const at::Tensor& gout, int64_t kh, int64_t kw,
                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                      int64_t groups) {
  const ConvGeom g =
      conv_geom_checked(x, gout, kh, kw, sh, sw, ph, pw, dh, dw, groups, c10::DeviceType::CPU);
  at::Tensor out = at::empty({g.N, g.C_out, g.C_in / groups, kh, kw}, x.options());
  if (out.numel() == 0) return out;
  if (g.oH * g.oW == 0) return out.zero_();
  // Stride 1 with a real kernel: shifted rows of a padded copy (no im2col). Strided convs,
  // and 1x1 without padding (whose patches are x's rows as they are), use conv_psg_impl.
  const bool shifted = sh == 1 && sw == 1 && !(kh == 1 && kw == 1 && ph == 0 && pw == 0);
  if (x.scalar_type() == at::kDouble) {
    auto* f = shifted ? &conv_psg_shifted<double> : &conv_psg_impl<double>;
    f(x.data_ptr<double>(), gout.data_ptr<double>(), out.data_ptr<double>(), g);
  } else {
    auto* f = shifted ? &conv_psg_shifted<float> : &conv_psg_impl<float>;
    f(x.data_ptr<float>(), gout.data_ptr<float>(), out.data_ptr<float>(), g);
  }
  return out;
}

}  // namespace fastntk
