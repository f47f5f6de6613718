// Register-blocked dot-product tile shared by the Gram and conv psg ops (no torch deps,
// so that it can be benchmarked standalone with plain g++).
#pragma once

#include <cstdint>
#include <cstring>

namespace fastntk {
namespace detail {

// GCC vector extensions of W lanes of the accumulator type: 256-bit vectors (VecTraits)
// compile to AVX+FMA in the "fma" clone of the callers (see FASTNTK_CLONES) and to SSE2 in
// the default clone; 512-bit ones (Vec512Traits) are used only inside functions compiled
// with target("avx512f") (FASTNTK_AVX512). Operands of type T are loaded W at a time and
// converted to Acc (float operands, double accumulation: the fp64_acc option).
template <typename T, typename Acc, int Lanes>
struct Vec {
  typedef Acc V __attribute__((vector_size(Lanes * sizeof(Acc))));
  typedef T In __attribute__((vector_size(Lanes * sizeof(T))));
  static constexpr int W = Lanes;
  static inline __attribute__((always_inline)) V load(const T* p) {
    In v;
    std::memcpy(&v, p, sizeof(In));
    if constexpr (sizeof(T) == sizeof(Acc)) {
      return v;
    } else {
      return __builtin_convertvector(v, V);
    }
  }
  // Pairwise: lanes i and i + W/2, then i and i + W/4, ...
  static inline __attribute__((always_inline)) Acc hsum(V v) {
    Acc s[Lanes];
    std::memcpy(s, &v, sizeof(V));
    for (int h = Lanes / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) s[i] += s[i + h];
    return s[0];
  }
};

template <typename T, typename Acc>
using VecTraits = Vec<T, Acc, 32 / sizeof(Acc)>;
template <typename T, typename Acc>
using Vec512Traits = Vec<T, Acc, 64 / sizeof(Acc)>;

// C[i*ldc + j] += sum_k A[i*lda + k] * B[j*ldb + k] for an MR x NR block.
// MR=4, NR=3 keeps 12 accumulators + 3 B vectors + 1 A vector in the 16 AVX2 registers.
template <int MR, int NR, typename Tr, typename T, typename Acc>
static inline __attribute__((always_inline)) void micro(const T* A, int64_t lda, const T* B,
                                                        int64_t ldb, int64_t K, Acc* C,
                                                        int64_t ldc) {
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

// C (mi x nj, leading dim ldc) += A (mi rows) . B (nj rows)^T over K, in MR x NR blocks
// of the vector traits Tr (VecTraits: 256-bit; Vec512Traits: 512-bit).
template <typename Tr, int MR, int NR, typename T, typename Acc>
static inline __attribute__((always_inline)) void tile_dot_w(const T* A, int64_t lda, int64_t mi,
                                                             const T* B, int64_t ldb, int64_t nj,
                                                             int64_t K, Acc* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + MR <= mi; i += MR) {
    int64_t j = 0;
    for (; j + NR <= nj; j += NR)
      micro<MR, NR, Tr>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
    for (; j < nj; ++j)
      micro<MR, 1, Tr>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
  }
  for (; i < mi; ++i) {
    int64_t j = 0;
    for (; j + NR <= nj; j += NR)
      micro<1, NR, Tr>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
    for (; j < nj; ++j)
      micro<1, 1, Tr>(A + i * lda, lda, B + j * ldb, ldb, K, C + i * ldc + j, ldc);
  }
}

// The AVX2 shape: 4 x 3 (12 accumulators in the 16 ymm registers).
template <typename T, typename Acc>
static inline __attribute__((always_inline)) void tile_dot(const T* A, int64_t lda, int64_t mi,
                                                           const T* B, int64_t ldb, int64_t nj,
                                                           int64_t K, Acc* C, int64_t ldc) {
  tile_dot_w<VecTraits<T, Acc>, 4, 3>(A, lda, mi, B, ldb, nj, K, C, ldc);
}

// The AVX-512 shape: 6 x 4 (24 accumulators + 4 B vectors + 1 A vector in the 32 zmm
// registers); only called from functions compiled with target("avx512f") (gram.cpp).
template <typename T, typename Acc>
static inline __attribute__((always_inline)) void tile_dot512(const T* A, int64_t lda, int64_t mi,
                                                              const T* B, int64_t ldb, int64_t nj,
                                                              int64_t K, Acc* C, int64_t ldc) {
  tile_dot_w<Vec512Traits<T, Acc>, 6, 4>(A, lda, mi, B, ldb, nj, K, C, ldc);
}


// Outer-product form, for short K (the conv psg, K = output positions of a row chunk):
// C (M x N, ldc) += A (M x K, A[i*lda + k]) . B (K x N, B[k*ldb + j]), N a multiple of 2W
// (the caller zero-pads B's columns). A block of MR rows x 2 vectors stays in registers for
// the whole K loop (no horizontal sums): MR = 6 -> 12 accumulators + 2 B vectors + 1
// broadcast A value in the 16 AVX registers.
template <int MR, typename T>
static inline __attribute__((always_inline)) void outer_micro(const T* A, int64_t lda,
                                                              const T* B, int64_t ldb,
                                                              int64_t K, T* C, int64_t ldc) {
  using Tr = VecTraits<T, T>;
  using V = typename Tr::V;
  V acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = Tr::load(B + k * ldb), b1 = Tr::load(B + k * ldb + Tr::W);
    for (int i = 0; i < MR; ++i) {
      const V a = V{} + A[i * lda + k];
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int h = 0; h < 2; ++h) {
      T* c = C + i * ldc + h * Tr::W;
      V v = Tr::load(c) + acc[i][h];
      std::memcpy(c, &v, sizeof(V));
    }
  }
}

template <typename T>
static inline __attribute__((always_inline)) void outer_gemm(const T* A, int64_t lda, int64_t M,
                                                             const T* B, int64_t ldb, int64_t N,
                                                             int64_t K, T* C, int64_t ldc) {
  constexpr int64_t NB = 2 * VecTraits<T, T>::W;
  for (int64_t j = 0; j < N; j += NB) {  // a K x NB panel of B stays in L1 across all rows
    int64_t i = 0;
    for (; i + 6 <= M; i += 6) outer_micro<6>(A + i * lda, lda, B + j, ldb, K, C + i * ldc + j, ldc);
    const T* a = A + i * lda;
    T* c = C + i * ldc + j;
    switch (M - i) {
      case 5: outer_micro<5>(a, lda, B + j, ldb, K, c, ldc); break;
      case 4: outer_micro<4>(a, lda, B + j, ldb, K, c, ldc); break;
      case 3: outer_micro<3>(a, lda, B + j, ldb, K, c, ldc); break;
      case 2: outer_micro<2>(a, lda, B + j, ldb, K, c, ldc); break;
      case 1: outer_micro<1>(a, lda, B + j, ldb, K, c, ldc); break;
      default: break;
    }
  }
}

// Same, with the rows of A given as pointers (A[i] + koff is row i): the stride-1 conv psg
// reads its patches straight out of a zero-padded copy of the input plane, one pointer per
// (c_in, ky, kx), instead of building an im2col buffer.
template <int MR, typename T>
static inline __attribute__((always_inline)) void outer_micro_rows(const T* const* A,
                                                                   int64_t koff, const T* B,
                                                                   int64_t ldb, int64_t K, T* C,
                                                                   int64_t ldc) {
  using Tr = VecTraits<T, T>;
  using V = typename Tr::V;
  V acc[MR][2];
  const T* a[MR];
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = acc[i][1] = V{};
    a[i] = A[i] + koff;
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = Tr::load(B + k * ldb), b1 = Tr::load(B + k * ldb + Tr::W);
    for (int i = 0; i < MR; ++i) {
      const V av = V{} + a[i][k];
      acc[i][0] += av * b0;
      acc[i][1] += av * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int h = 0; h < 2; ++h) {
      T* c = C + i * ldc + h * Tr::W;
      V v = Tr::load(c) + acc[i][h];
      std::memcpy(c, &v, sizeof(V));
    }
  }
}

template <typename T>
static inline __attribute__((always_inline)) void outer_gemm_rows(const T* const* A, int64_t koff,
                                                                  int64_t M, const T* B,
                                                                  int64_t ldb, int64_t N,
                                                                  int64_t K, T* C, int64_t ldc) {
  constexpr int64_t NB = 2 * VecTraits<T, T>::W;
  for (int64_t j = 0; j < N; j += NB) {
    int64_t i = 0;
    for (; i + 6 <= M; i += 6)
      outer_micro_rows<6>(A + i, koff, B + j, ldb, K, C + i * ldc + j, ldc);
    for (; i < M; ++i) outer_micro_rows<1>(A + i, koff, B + j, ldb, K, C + i * ldc + j, ldc);
  }
}

}  // namespace detail
}  // namespace fastntk

// Function multi-versioning: an AVX+FMA clone picked at load time where the CPU has FMA.
// (Not "arch=haswell": its resolver tests for an Intel Haswell *model* and falls back to
// SSE2 on AMD EPYC, several times slower there.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTNTK_CLONES __attribute__((target_clones("fma", "default")))
// A function compiled for AVX-512F (called only after __builtin_cpu_supports("avx512f")).
#define FASTNTK_AVX512 __attribute__((target("avx512f,fma")))
#define FASTNTK_HAVE_AVX512_PATH 1
#else
#define FASTNTK_CLONES
#define FASTNTK_HAVE_AVX512_PATH 0
#endif
