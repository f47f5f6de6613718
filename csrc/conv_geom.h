// Shape of one 2-D convolution's per-sample weight gradient, shared by the CPU op
// (conv_psg.cpp) and the CUDA op (cuda/). Torch-free: nvcc compiles it without ATen.
#pragma once

#include <cstdint>

namespace fastntk {

struct ConvGeom {
  int64_t N, C_in, H, W, C_out, oH, oW, kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

}  // namespace fastntk
