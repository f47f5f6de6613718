// Per-sample Conv2d weight gradient on the CPU, without an unfold buffer.
//
// For sample n and group g:  G[n, g] (C_out/g x D) = gout[n, g] (C_out/g x T) . U^T,
// U (D x T) the im2col patches of x[n, g], D = C_in/g * kh * kw, T = oH * oW.
// U is built a few output rows at a time into a per-thread scratch of D x ~256 values
// (never the N x D x T unfold tensor), then multiplied by the register-blocked
// dot-product tile of fastntk.h. OpenMP over (sample, group) items; only the diagonal
// group blocks are computed (no groups^2 waste for depthwise).
#include <omp.h>

#include <algorithm>
#include <vector>

#include <ATen/ops/empty.h>

#include "fastntk.h"

namespace fastntk {
namespace {

struct ConvGeom {
  int64_t N, C_in, H, W, C_out, oH, oW, kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

#define FASTNTK_DEFINE_DOT(NAME, T)                                                         \
  FASTNTK_CLONES void NAME(const T* A, int64_t lda, int64_t mi, const T* B, int64_t ldb, \
                           int64_t nj, int64_t K, T* C, int64_t ldc) {                    \
    detail::tile_dot<T, T>(A, lda, mi, B, ldb, nj, K, C, ldc);                            \
  }
FASTNTK_DEFINE_DOT(dot_f32, float)
FASTNTK_DEFINE_DOT(dot_f64, double)
#undef FASTNTK_DEFINE_DOT

inline void dot(const float* A, int64_t lda, int64_t mi, const float* B, int64_t ldb, int64_t nj,
                int64_t K, float* C, int64_t ldc) {
  dot_f32(A, lda, mi, B, ldb, nj, K, C, ldc);
}
inline void dot(const double* A, int64_t lda, int64_t mi, const double* B, int64_t ldb,
                int64_t nj, int64_t K, double* C, int64_t ldc) {
  dot_f64(A, lda, mi, B, ldb, nj, K, C, ldc);
}

template <typename T>
void conv_psg_impl(const T* x, const T* gout, T* out, const ConvGeom& g) {
  const int64_t cin_g = g.C_in / g.groups, cout_g = g.C_out / g.groups;
  const int64_t khw = g.kh * g.kw, D = cin_g * khw, T_ = g.oH * g.oW;
  // Output rows per chunk: ~256 positions, so U is at most D x 256 (576 x 256 floats at
  // C_in = 64, 3x3) and stays in L2 while all C_out/g rows of gout stream past it.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(g.oH, 256 / std::max<int64_t>(1, g.oW)));
  const int64_t items = g.N * g.groups;
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(items)));
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> U(static_cast<size_t>(D * rows * g.oW));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / g.groups, grp = it % g.groups;
      T* G = out + (n * g.C_out + grp * cout_g) * D;  // (cout_g, D), contiguous
      std::fill(G, G + cout_g * D, T(0));
      const T* xs = x + (n * g.C_in + grp * cin_g) * g.H * g.W;
      const T* gs = gout + (n * g.C_out + grp * cout_g) * T_;
      for (int64_t oy0 = 0; oy0 < g.oH; oy0 += rows) {
        const int64_t ny = std::min(rows, g.oH - oy0), len = ny * g.oW;
        for (int64_t ci = 0; ci < cin_g; ++ci) {
          const T* xc = xs + ci * g.H * g.W;
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              T* row = U.data() + ((ci * g.kh + ky) * g.kw + kx) * len;
              const int64_t xoff = kx * g.dw - g.pw;
              // valid ox: 0 <= ox*sw + xoff < W
              int64_t lo = xoff >= 0 ? 0 : (-xoff + g.sw - 1) / g.sw;
              int64_t hi = g.W - xoff <= 0 ? 0 : (g.W - xoff + g.sw - 1) / g.sw;
              lo = std::min(lo, g.oW);
              hi = std::max(lo, std::min(hi, g.oW));
              for (int64_t yy = 0; yy < ny; ++yy) {
                T* dst = row + yy * g.oW;
                const int64_t iy = (oy0 + yy) * g.sh - g.ph + ky * g.dh;
                if (iy < 0 || iy >= g.H) {
                  std::fill(dst, dst + g.oW, T(0));
                  continue;
                }
                const T* src = xc + iy * g.W + xoff;
                std::fill(dst, dst + lo, T(0));
                if (g.sw == 1) {
                  std::copy(src + lo, src + hi, dst + lo);
                } else {
                  for (int64_t ox = lo; ox < hi; ++ox) dst[ox] = src[ox * g.sw];
                }
                std::fill(dst + hi, dst + g.oW, T(0));
              }
            }
          }
        }
        dot(gs + oy0 * g.oW, T_, cout_g, U.data(), len, D, len, G, D);
      }
    }
  }
}

}  // namespace

at::Tensor conv2d_psg(const at::Tensor& x, const at::Tensor& gout, int64_t kh, int64_t kw,
                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                      int64_t groups) {
  TORCH_CHECK(x.device().is_cpu() && gout.device().is_cpu(),
              "fastntk.conv2d_psg: x and gout must be CPU tensors");
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
  at::Tensor out = at::empty({g.N, g.C_out, g.C_in / groups, kh, kw}, x.options());
  if (out.numel() == 0) return out;
  if (g.oH * g.oW == 0) return out.zero_();
  if (x.scalar_type() == at::kDouble) {
    conv_psg_impl<double>(x.data_ptr<double>(), gout.data_ptr<double>(), out.data_ptr<double>(), g);
  } else {
    conv_psg_impl<float>(x.data_ptr<float>(), gout.data_ptr<float>(), out.data_ptr<float>(), g);
  }
  return out;
}

}  // namespace fastntk
