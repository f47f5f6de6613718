// Register-blocked dot-product tile shared by the Gram and conv psg ops (no torch deps,
// so that it can be benchmarked standalone with plain g++).
#pragma once

#include <cstdint>
#include <cstring>

namespace fastntk {
namespace detail {

// GCC vector extensions: compiled to AVX+FMA in the "fma" clone of the
// callers (see FASTNTK_CLONES) and to SSE2 in the default clone.
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));

template <typename T, typename Acc>
struct VecTraits;

template <>
struct VecTraits<float, float> {
  using V = v8f;
  static constexpr int W = 8;
  static inline __attribute__((always_inline)) V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline __attribute__((always_inline)) float hsum(V v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
  }
};

template <>
struct VecTraits<double, double> {
  using V = v4d;
  static constexpr int W = 4;
  static inline __attribute__((always_inline)) V load(const double* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline __attribute__((always_inline)) double hsum(V v) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  }
};

// float operands, double accumulation (the fp64_acc option).
template <>
struct VecTraits<float, double> {
  using V = v4d;
  static constexpr int W = 4;
  static inline __attribute__((always_inline)) V load(const float* p) {
    v4f v;
    std::memcpy(&v, p, sizeof(v4f));
    return __builtin_convertvector(v, v4d);
  }
  static inline __attribute__((always_inline)) double hsum(V v) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  }
};

// C[i*ldc + j] += sum_k A[i*lda + k] * B[j*ldb + k] for an MR x NR block.
// MR=4, NR=3 keeps 12 accumulators + 3 B vectors + 1 A vector in the 16 AVX2 registers.
template <int MR, int NR, typename T, typename Acc>
static inline __attribute__((always_inline)) void micro(const T* A, int64_t lda, const T* B,
                                                        int64_t ldb, int64_t K, Acc* C,
                                                        int64_t ldc) {
  using Tr = VecTraits<T, Acc>;
  using V = typename Tr::V;
  V acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V{};
  int64_t k = 0;
  for (; k + Tr::W <= K; k += Tr::W) {
    V bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = Tr::load(B + j * ldb + k);
    for (int i = 0; i < MR; ++i) {
      const V av = Tr::load(A + i * lda + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      Acc s = Tr::hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk)
        s += static_cast<Acc>(A[i * lda + kk]) * static_cast<Acc>(B[j * ldb + kk]);
      C[i * ldc + j] += s;
    }
  }
}

// C (mi x nj, leading dim ldc) += A (mi rows) . B (nj rows)^T over K.
template <typename T, typename Acc>
static inline __attribute__((always_inline)) void tile_dot(const T* A, int64_t lda, int64_t mi,
                                                           const T* B, int64_t ldb, int64_t nj,
                                                           int64_t K, Acc* C, int64_t ldc) {
  constexpr int MR = 4, NR = 3;
  int64_t i = 0;
  for (; i + MR <= mi; i += MR) {
    int64_t j = 0;
    for (; j + NR <= nj; j += NR)
      micro<MR, NR>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
    for (; j < nj; ++j) micro<MR, 1>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
  }
  for (; i < mi; ++i) {
    int64_t j = 0;
    for (; j + NR <= nj; j += NR)
      micro<1, NR>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
    for (; j < nj; ++j) micro<1, 1>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
  }
}

}  // namespace detail
}  // namespace fastntk

// Function multi-versioning: an AVX+FMA clone picked at load time where the CPU has FMA.
// (Not "arch=haswell": its resolver tests for an Intel Haswell *model* and falls back to
// SSE2 on AMD EPYC, measured 8x slower there.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTNTK_CLONES __attribute__((target_clones("fma", "default")))
#else
#define FASTNTK_CLONES
#endif
