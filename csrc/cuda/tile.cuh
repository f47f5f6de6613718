// The register-tile product shared by fastntk's CUDA kernels (gram.cu, conv_psg.cu): a
// block of Threads x Threads threads, each holding Per x Per accumulators; the operands'
// K slices sit in shared memory k-major (element (k, row) at k * Pad + row), and thread
// (tx, ty) owns rows ty + u*Threads of the first operand and tx + v*Threads of the second.
#pragma once

namespace fastntk {
namespace cuda {

// Stage one K slice of both operands in shared memory, k-major: for every (row, kk) of a
// Tile x K slice, a[kk * Pad + row] = load_a(row, kk) and b[...] = load_b(row, kk) (the
// loaders return zero past the edges). kk runs fastest across threads, so consecutive
// threads read consecutive K positions of one row.
template <int Tile, int Threads, int K, int Pad, typename T, typename LoadA, typename LoadB>
__device__ inline void stage_slices(T* a, T* b, int tid, LoadA load_a, LoadB load_b) {
#pragma unroll
  for (int r = 0; r < Tile * K / (Threads * Threads); ++r) {
    const int e = tid + r * Threads * Threads;
    const int row = e / K, kk = e % K;
    a[kk * Pad + row] = load_a(row, kk);
    b[kk * Pad + row] = load_b(row, kk);
  }
}

template <int Per, typename Acc>
__device__ inline void zero_tile(Acc (&acc)[Per][Per]) {
#pragma unroll
  for (int u = 0; u < Per; ++u)
#pragma unroll
    for (int v = 0; v < Per; ++v) acc[u][v] = Acc(0);
}

// acc[u][v] += sum over the K slice of a[k, ty + u*Threads] * b[k, tx + v*Threads].
template <int Per, int Threads, int K, int Pad, typename Acc, typename T>
__device__ inline void fma_slices(Acc (&acc)[Per][Per], const T* a, const T* b, int tx, int ty) {
#pragma unroll
  for (int kk = 0; kk < K; ++kk) {
    Acc av[Per], bv[Per];
#pragma unroll
    for (int u = 0; u < Per; ++u) av[u] = static_cast<Acc>(a[kk * Pad + ty + u * Threads]);
#pragma unroll
    for (int v = 0; v < Per; ++v) bv[v] = static_cast<Acc>(b[kk * Pad + tx + v * Threads]);
#pragma unroll
    for (int u = 0; u < Per; ++u)
#pragma unroll
      for (int v = 0; v < Per; ++v) acc[u][v] = fma(av[u], bv[v], acc[u][v]);
  }
}

// The whole product: acc = sum over k < k_total of load_a(row, k) * load_b(col, k) for this
// thread's rows and columns (loaders take the absolute k; zero past the edges), K at a
// time through the two shared-memory slices a and b (K * Pad elements each).
template <int Tile, int Threads, int K, int Pad, typename Acc, typename T, typename LoadA,
          typename LoadB>
__device__ inline void tile_product(Acc (&acc)[Tile / Threads][Tile / Threads], T* a, T* b,
                                    long long k_total, LoadA load_a, LoadB load_b) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * Threads + tx;
  zero_tile(acc);
  for (long long k0 = 0; k0 < k_total; k0 += K) {
    stage_slices<Tile, Threads, K, Pad>(
        a, b, tid, [&](int row, int kk) { return load_a(row, k0 + kk); },
        [&](int row, int kk) { return load_b(row, k0 + kk); });
    __syncthreads();
    fma_slices<Tile / Threads, Threads, K, Pad>(acc, a, b, tx, ty);
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace fastntk
