// Gram accumulation on the GPU: out += a a^T (symmetric) and out += a b^T (cross).
//
// One thread block per 64x64 output tile, 16x16 threads with 4x4 outputs each; the
// symmetric kernel runs only the t(t+1)/2 tile pairs with tile_j >= tile_i (a 1-D grid
// mapped to pairs in closed form) and writes each off-diagonal tile a second time,
// transposed through shared memory so that the mirrored rows are written coalesced.
// Every output element belongs to exactly one block: no atomics.
//
// Output (r, c) of a diagonal tile and (c, r) are computed by two threads with the same
// k order from the same two products (a_rk a_ck == a_ck a_rk in IEEE arithmetic), so the
// result is exactly symmetric without averaging. Plain FMA arithmetic in the accumulator
// type (no tensor cores: this is the ieee/float64-accumulation path; the Triton kernel
// of kernels/gram.py has the tf32/bf16 modes).
#include <cmath>

#include "launch.h"
#include "tile.cuh"

namespace fastntk {
namespace cuda {
namespace {

constexpr int kTile = 64;            // output tile edge
constexpr int kThreads = 16;         // threads per tile edge (kTile / kThreads outputs each)
constexpr int kPer = kTile / kThreads;
constexpr int kK = 16;               // K slice staged in shared memory
constexpr int kPad = kTile + 1;      // row pitch of the staged slices (no bank conflicts)

// (tile_i, tile_j), tile_j >= tile_i, of the p-th upper-triangle pair in row-major order
// over t tiles: row i starts at offset i*t - i*(i-1)/2.
__device__ inline void upper_pair(long long p, long long t, long long* ti, long long* tj) {
  const double b = 2.0 * static_cast<double>(t) + 1.0;
  long long i = static_cast<long long>((b - sqrt(b * b - 8.0 * static_cast<double>(p))) / 2.0);
  if (i < 0) i = 0;
  if (i > t - 1) i = t - 1;
  // Correct the floating-point estimate by at most a step either way.
  while (i > 0 && i * t - i * (i - 1) / 2 > p) --i;
  while (i + 1 < t && (i + 1) * t - (i + 1) * i / 2 <= p) ++i;
  *ti = i;
  *tj = i + (p - (i * t - i * (i - 1) / 2));
}

template <typename T, typename Acc, typename O>
__global__ void __launch_bounds__(kThreads* kThreads)
    gram_kernel(const T* __restrict__ a, long long lda, long long n1, const T* __restrict__ b,
                long long ldb, long long n2, long long p, O* __restrict__ out, long long ldo,
                bool sym, long long tiles) {
  // One raw buffer: the two K slices during the product, the accumulator tile for the
  // mirrored write after it.
  constexpr int kSliceBytes = 2 * kK * kPad * static_cast<int>(sizeof(T));
  constexpr int kStageBytes = kTile * kPad * static_cast<int>(sizeof(Acc));
  __shared__ __align__(16) unsigned char smem[kSliceBytes > kStageBytes ? kSliceBytes : kStageBytes];
  T* as = reinterpret_cast<T*>(smem);   // as[k * kPad + row]
  T* bs = as + kK * kPad;               // bs[k * kPad + col]

  long long ti, tj;
  if (sym) {
    upper_pair(static_cast<long long>(blockIdx.x), tiles, &ti, &tj);
  } else {
    ti = blockIdx.y;
    tj = blockIdx.x;
  }
  const long long i0 = ti * kTile, j0 = tj * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;

  // a[i0:i0+64, :] and b[j0:j0+64, :], 16 columns at a time; zeros past the edges.
  Acc acc[kPer][kPer];
  tile_product<kTile, kThreads, kK, kPad>(
      acc, as, bs, p,
      [&](int row, long long k) {
        const long long gi = i0 + row;
        return (gi < n1 && k < p) ? a[gi * lda + k] : T(0);
      },
      [&](int row, long long k) {
        const long long gj = j0 + row;
        return (gj < n2 && k < p) ? b[gj * ldb + k] : T(0);
      });

#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const long long gi = i0 + ty + u * kThreads;
#pragma unroll
    for (int v = 0; v < kPer; ++v) {
      const long long gj = j0 + tx + v * kThreads;
      if (gi < n1 && gj < n2) out[gi * ldo + gj] += static_cast<O>(acc[u][v]);
    }
  }
  if (!sym || ti == tj) return;
  // Mirror: out[j0 + c, i0 + r] += C[r, c], staged so that a warp writes along a row.
  Acc* cs = reinterpret_cast<Acc*>(smem);  // cs[r * kPad + c]; the slices are done with
#pragma unroll
  for (int u = 0; u < kPer; ++u)
#pragma unroll
    for (int v = 0; v < kPer; ++v) cs[(ty + u * kThreads) * kPad + tx + v * kThreads] = acc[u][v];
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int c = ty + u * kThreads;  // output row j0 + c
#pragma unroll
    for (int v = 0; v < kPer; ++v) {
      const int r = tx + v * kThreads;  // output column i0 + r
      const long long gr = j0 + c, gc = i0 + r;
      if (gr < n1 && gc < n1) out[gr * ldo + gc] += static_cast<O>(cs[r * kPad + c]);
    }
  }
}

}  // namespace

template <typename T, typename Acc, typename O>
cudaError_t gram(const T* a, int64_t lda, int64_t n1, const T* b, int64_t ldb, int64_t n2,
                 int64_t p, O* out, int64_t ldo, bool sym, cudaStream_t stream) {
  if (n1 == 0 || n2 == 0 || p == 0) return cudaSuccess;
  const long long t1 = (n1 + kTile - 1) / kTile, t2 = (n2 + kTile - 1) / kTile;
  const dim3 block(kThreads, kThreads);
  dim3 grid;
  if (sym) {
    const long long pairs = t1 * (t1 + 1) / 2;
    if (pairs > 0x7fffffffLL) return cudaErrorInvalidValue;  // N > ~4.2M rows
    grid = dim3(static_cast<unsigned>(pairs));
  } else {
    if (t2 > 0x7fffffffLL || t1 > 65535) return cudaErrorInvalidValue;
    grid = dim3(static_cast<unsigned>(t2), static_cast<unsigned>(t1));
  }
  gram_kernel<T, Acc, O><<<grid, block, 0, stream>>>(a, lda, n1, b, ldb, n2, p, out, ldo, sym, t1);
  return cudaGetLastError();
}

template cudaError_t gram<float, float, float>(const float*, int64_t, int64_t, const float*,
                                               int64_t, int64_t, int64_t, float*, int64_t,
                                               bool, cudaStream_t);
template cudaError_t gram<float, double, float>(const float*, int64_t, int64_t, const float*,
                                                int64_t, int64_t, int64_t, float*, int64_t,
                                                bool, cudaStream_t);
template cudaError_t gram<float, double, double>(const float*, int64_t, int64_t, const float*,
                                                 int64_t, int64_t, int64_t, double*, int64_t,
                                                 bool, cudaStream_t);
template cudaError_t gram<double, double, double>(const double*, int64_t, int64_t,
                                                  const double*, int64_t, int64_t, int64_t,
                                                  double*, int64_t, bool, cudaStream_t);

}  // namespace cuda
}  // namespace fastntk
