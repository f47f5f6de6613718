// fastntk C++ extension: declarations of the CPU ops.
//
// The ops are registered in ops.cpp with TORCH_LIBRARY(fastntk, m) and called as
// torch.ops.fastntk.<name>. Only light ATen headers here (not torch/extension.h), which
// keeps the build of the files that include it short.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "conv_geom.h"

namespace fastntk {

// out += a a^T (upper-triangle tiles, mirrored). a: (N, P), rows contiguous.
void gram_sym(const at::Tensor& a, at::Tensor& out, bool fp64_acc);
// out += a b^T. a: (N1, P), b: (N2, P), rows contiguous.
void gram_cross(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool fp64_acc);
// Per-sample Conv2d weight gradient (N, C_out, C_in/groups, kh, kw), no unfold buffer.
at::Tensor conv2d_psg(const at::Tensor& x, const at::Tensor& gout, int64_t kh, int64_t kw,
                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                      int64_t groups);
// Per-sample channel-affine gradients in one pass: {sum_s g*(x - mean), sum_s g}, each (N, C).
// x, g: (N, C, ...) contiguous; mean: (C) or (N, C).
std::vector<at::Tensor> affine_psg(const at::Tensor& x, const at::Tensor& g,
                                   const at::Tensor& mean);

// Argument checks shared by the CPU ops and the CUDA ops (cuda/ops_cuda.cpp): `device` is
// the device type the op runs on; b may be null (symmetric Gram).
void check_gram_args(const at::Tensor& a, const at::Tensor* b, const at::Tensor& out,
                     c10::DeviceType device);
ConvGeom conv_geom_checked(const at::Tensor& x, const at::Tensor& gout, int64_t kh, int64_t kw,
                           int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                           int64_t dw, int64_t groups, c10::DeviceType device);
// Distance between rows of a 2-D tensor whose rows are contiguous (its width for one row).
inline int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

}  // namespace fastntk
