// Launchers of fastntk's CUDA kernels (gram.cu, conv_psg.cu). Torch-free, so that nvcc
// compiles the kernels without ATen's headers; the torch ops that call them, with their
// argument checks, are in ops_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../conv_geom.h"

namespace fastntk {
namespace cuda {

// out (ldo) += a a^T when sym (a == b, n1 == n2: upper-triangle tiles, each off-diagonal
// tile also written mirrored), else out += a b^T. Rows of a, b, out contiguous.
// Instantiated for <float, float, float>, <float, double, float>, <float, double, double>
// and <double, double, double> (input, accumulator, output).
template <typename T, typename Acc, typename O>
cudaError_t gram(const T* a, int64_t lda, int64_t n1, const T* b, int64_t ldb, int64_t n2,
                 int64_t p, O* out, int64_t ldo, bool sym, cudaStream_t stream);

// out (N, C_out, C_in/groups, kh, kw) = per-sample weight gradients, x and gout contiguous
// NCHW, the patches read straight from x (no im2col buffer). float and double.
template <typename T>
cudaError_t conv2d_psg(const T* x, const T* gout, T* out, const ConvGeom& g,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace fastntk
