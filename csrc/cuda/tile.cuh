// The register-tile product shared by fastntk's CUDA kernels (gram.cu, conv_psg.cu): a
// block of Threads x Threads threads, each holding Per x Per accumulators; the operands'
// K slices sit in shared memory k-major (element (k, row) at k * Pad + row), and thread
// (tx, ty) owns rows ty + u*Threads of the first operand and tx + v*Threads of the second.
#pragma once

namespace fastntk {
namespace cuda {

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

}  // namespace cuda
}  // namespace fastntk
