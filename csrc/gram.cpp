// Blocked Gram accumulation on the CPU: out += a a^T (symmetric) and out += a b^T.
//
// Output tiles of TB x TB; the symmetric version visits only the tile pairs with
// tile_j >= tile_i and writes each off-diagonal tile twice (itself and its mirror), so
// every output element belongs to exactly one pair: OpenMP over pairs needs no locks.
// Inside a pair the K dimension is walked in chunks of KC so that the A and B rows of
// the micro-kernel stay in L1/L2.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "fastntk.h"
#include "tile.h"

namespace fastntk {
namespace {

// One TB x TB tile of dot products, C (ldc = TB) zero on entry, K walked in chunks of kc.
// Instantiated per dtype as non-inline functions: the AVX2 ones (tile.h's 4x3 blocks of
// 256-bit vectors) get an AVX2+FMA clone from FASTNTK_CLONES; the AVX-512 ones (6x4 blocks
// of 512-bit vectors) are compiled for AVX-512F: symmetric Grams 1.2-1.45x faster than with
// the AVX2 blocks at the large shapes (python bench/bench_engine_choices.py gram, columns
// "sym C++ AVX2" and "sym C++"; 2-core AMD EPYC, bench/results/engine_choices_cpu.md).
#define FASTNTK_DEFINE_TILE(NAME, ATTR, TILE, T, ACC)                                       \
  ATTR void NAME(const T* A, int64_t lda, int64_t mi, const T* B, int64_t ldb, int64_t nj, \
                 int64_t K, int64_t kc, ACC* C, int64_t ldc) {                             \
    for (int64_t k0 = 0; k0 < K; k0 += kc) {                                               \
      const int64_t kl = std::min(kc, K - k0);                                             \
      detail::TILE<T, ACC>(A + k0, lda, mi, B + k0, ldb, nj, kl, C, ldc);                  \
    }                                                                                      \
  }

FASTNTK_DEFINE_TILE(tile_f32, FASTNTK_CLONES, tile_dot, float, float)
FASTNTK_DEFINE_TILE(tile_f32_acc64, FASTNTK_CLONES, tile_dot, float, double)
FASTNTK_DEFINE_TILE(tile_f64, FASTNTK_CLONES, tile_dot, double, double)
#if FASTNTK_HAVE_AVX512_PATH
FASTNTK_DEFINE_TILE(tile_f32_512, FASTNTK_AVX512, tile_dot512, float, float)
FASTNTK_DEFINE_TILE(tile_f32_acc64_512, FASTNTK_AVX512, tile_dot512, float, double)
FASTNTK_DEFINE_TILE(tile_f64_512, FASTNTK_AVX512, tile_dot512, double, double)
#endif
#undef FASTNTK_DEFINE_TILE

// Whether this call uses the AVX-512 tiles: the CPU has AVX-512F and FASTNTK_NO_AVX512 is
// not "1" (read at each call, so that a benchmark can compare both in one process).
bool use_avx512() {
#if FASTNTK_HAVE_AVX512_PATH
  static const bool cpu_has = __builtin_cpu_supports("avx512f");
  if (!cpu_has) return false;
  const char* off = std::getenv("FASTNTK_NO_AVX512");
  return off == nullptr || std::strcmp(off, "1") != 0;
#else
  return false;
#endif
}

// K chunk per micro-kernel call. Long chunks amortise the 12 horizontal sums at the end of
// each call; a chunk keeps the panels of a tile in cache (bench/bench_gram.py times the op,
// bench/results/gram_cpu_t*.md).
constexpr int64_t kKcF32 = 4096;
constexpr int64_t kKcF64 = 2048;

#if FASTNTK_HAVE_AVX512_PATH
#define FASTNTK_PICK(NAME) (wide ? NAME##_512 : NAME)
#else
#define FASTNTK_PICK(NAME) NAME
#endif

inline void tile(bool wide, const float* A, int64_t lda, int64_t mi, const float* B,
                 int64_t ldb, int64_t nj, int64_t K, float* C, int64_t ldc) {
  FASTNTK_PICK(tile_f32)(A, lda, mi, B, ldb, nj, K, kKcF32, C, ldc);
}
inline void tile(bool wide, const float* A, int64_t lda, int64_t mi, const float* B,
                 int64_t ldb, int64_t nj, int64_t K, double* C, int64_t ldc) {
  FASTNTK_PICK(tile_f32_acc64)(A, lda, mi, B, ldb, nj, K, kKcF32, C, ldc);
}
inline void tile(bool wide, const double* A, int64_t lda, int64_t mi, const double* B,
                 int64_t ldb, int64_t nj, int64_t K, double* C, int64_t ldc) {
  FASTNTK_PICK(tile_f64)(A, lda, mi, B, ldb, nj, K, kKcF64, C, ldc);
}
#undef FASTNTK_PICK

template <typename T, typename Acc, typename O>
void gram_impl(const T* A, int64_t lda, int64_t n1, const T* B, int64_t ldb, int64_t n2,
               int64_t P, O* out, int64_t ldo, bool sym) {
  // 32x32 tiles keep both tiles' K-chunks (2 x 32 x 4096 floats = 1 MB) in L2; smaller
  // tiles for small N so that two threads get enough pairs.
  const int64_t TB = std::min<int64_t>(n1, n2) >= 128 ? 32 : 16;
  const int64_t t1 = (n1 + TB - 1) / TB, t2 = (n2 + TB - 1) / TB;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(sym ? t1 * (t1 + 1) / 2 : t1 * t2);
  for (int64_t i = 0; i < t1; ++i)
    for (int64_t j = sym ? i : 0; j < t2; ++j) pairs.emplace_back(i, j);
  const int64_t np = static_cast<int64_t>(pairs.size());
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(np)));
  const bool wide = use_avx512();
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<Acc> C(TB * TB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < np; ++p) {
      const int64_t i0 = pairs[p].first * TB, j0 = pairs[p].second * TB;
      const int64_t mi = std::min(TB, n1 - i0), nj = std::min(TB, n2 - j0);
      std::fill(C.begin(), C.end(), Acc(0));
      tile(wide, A + i0 * lda, lda, mi, B + j0 * ldb, ldb, nj, P, C.data(), TB);
      for (int64_t i = 0; i < mi; ++i)
        for (int64_t j = 0; j < nj; ++j) out[(i0 + i) * ldo + (j0 + j)] += static_cast<O>(C[i * TB + j]);
      if (sym && i0 != j0) {
        for (int64_t j = 0; j < nj; ++j)
          for (int64_t i = 0; i < mi; ++i) out[(j0 + j) * ldo + (i0 + i)] += static_cast<O>(C[i * TB + j]);
      }
    }
  }
}

void dispatch(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool fp64_acc,
              bool sym) {
  const int64_t n1 = a.size(0), n2 = b.size(0), P = a.size(1);
  if (n1 == 0 || n2 == 0 || P == 0) return;
  const int64_t lda = row_stride(a), ldb = row_stride(b), ldo = row_stride(out);
  if (a.scalar_type() == at::kDouble) {
    gram_impl<double, double, double>(a.data_ptr<double>(), lda, n1, b.data_ptr<double>(), ldb,
                                      n2, P, out.data_ptr<double>(), ldo, sym);
  } else if (out.scalar_type() == at::kDouble) {
    gram_impl<float, double, double>(a.data_ptr<float>(), lda, n1, b.data_ptr<float>(), ldb, n2,
                                     P, out.data_ptr<double>(), ldo, sym);
  } else if (fp64_acc) {
    gram_impl<float, double, float>(a.data_ptr<float>(), lda, n1, b.data_ptr<float>(), ldb, n2,
                                    P, out.data_ptr<float>(), ldo, sym);
  } else {
    gram_impl<float, float, float>(a.data_ptr<float>(), lda, n1, b.data_ptr<float>(), ldb, n2, P,
                                   out.data_ptr<float>(), ldo, sym);
  }
}

}  // namespace

void check_no_alias(const at::Tensor& t, const at::Tensor& out, const char* name) {
  TORCH_CHECK(!out.is_alias_of(t), "fastntk: out must not share memory with ", name);
}

void check_gram_operand(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, "fastntk: ", name, " must be a ",
              device == c10::DeviceType::CUDA ? "CUDA" : "CPU", " tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "fastntk: ", name, " must be 2-D (N, P), got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastntk: ", name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1,
              "fastntk: ", name, " must have contiguous rows (stride(1) == 1), got strides ",
              t.strides());
}

void check_gram_out(const at::Tensor& a, const at::Tensor& out, int64_t n1, int64_t n2) {
  TORCH_CHECK(out.device() == a.device(), "fastntk: out must be on ", a.device(), ", got ",
              out.device());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n1 && out.size(1) == n2,
              "fastntk: out must have shape (", n1, ", ", n2, "), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "fastntk: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(!(a.scalar_type() == at::kDouble && out.scalar_type() == at::kFloat),
              "fastntk: float64 input needs a float64 out");
  TORCH_CHECK(n2 <= 1 || out.stride(1) == 1,
              "fastntk: out must have contiguous rows (stride(1) == 1), got strides ",
              out.strides());
  TORCH_CHECK(n1 <= 1 || out.stride(0) >= n2, "fastntk: out rows overlap (stride(0) = ",
              out.stride(0), " < ", n2, ")");
}

void check_gram_args(const at::Tensor& a, const at::Tensor* b, const at::Tensor& out,
                     c10::DeviceType device) {
  check_gram_operand(a, "a", device);
  if (b != nullptr) {
    check_gram_operand(*b, "b", device);
    TORCH_CHECK(b->device() == a.device(), "fastntk: a and b are on different devices (",
                a.device(), ", ", b->device(), ")");
    TORCH_CHECK(a.size(1) == b->size(1), "fastntk: a and b need the same width P, got ",
                a.size(1), " and ", b->size(1));
    TORCH_CHECK(a.scalar_type() == b->scalar_type(), "fastntk: a and b dtypes differ (",
                a.scalar_type(), ", ", b->scalar_type(), ")");
  }
  const at::Tensor& bb = b != nullptr ? *b : a;
  check_gram_out(a, out, a.size(0), bb.size(0));
  check_no_alias(a, out, "a");
  if (b != nullptr) check_no_alias(*b, out, "b");
}

void gram_sym(const at::Tensor& a, at::Tensor& out, bool fp64_acc) {
  check_gram_args(a, nullptr, out, c10::DeviceType::CPU);
  dispatch(a, a, out, fp64_acc, /*sym=*/true);
}

void gram_cross(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool fp64_acc) {
  check_gram_args(a, &b, out, c10::DeviceType::CPU);
  dispatch(a, b, out, fp64_acc, /*sym=*/false);
}

}  // namespace fastntk
