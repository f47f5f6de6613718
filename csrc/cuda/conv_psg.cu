// Per-sample Conv2d weight gradients on the GPU, patches read straight from x.
//
// For sample n and group g the gradient is a small GEMM over the T = oH*oW output
// positions: G[n, g*Mg + m, d] = sum_t gout[n, g*Mg + m, t] * patch(n, g, d, t), with
// Mg = C_out/groups rows, D = C_in/groups * kh * kw columns and patch(d, t) the input
// value under kernel tap d at output position t (zero in the padding). One thread block
// per 32x32 tile of (m, d) of one (sample, group); the T dimension is walked in slices of
// 16 staged in shared memory, the patch slice gathered from x on the fly (implicit
// im2col: no N*D*T buffer). Only the diagonal group blocks are computed.
#include "launch.h"
#include "tile.cuh"

namespace fastntk {
namespace cuda {
namespace {

constexpr int kTile = 32;
constexpr int kThreads = 16;
constexpr int kPer = kTile / kThreads;
constexpr int kK = 16;
constexpr int kPad = kTile + 1;

template <typename T>
__global__ void __launch_bounds__(kThreads* kThreads)
    conv_psg_kernel(const T* __restrict__ x, const T* __restrict__ gout, T* __restrict__ out,
                    ConvGeom g, long long m_tiles, long long d_tiles) {
  __shared__ T gs[kK * kPad];  // gs[t * kPad + m]
  __shared__ T ps[kK * kPad];  // ps[t * kPad + d]
  const long long mg = g.C_out / g.groups, cg = g.C_in / g.groups;
  const long long taps = g.kh * g.kw, D = cg * taps, T_ = g.oH * g.oW;
  // blockIdx.x -> (sample*group item, m tile, d tile), d fastest.
  long long id = blockIdx.x;
  const long long dt = id % d_tiles;
  id /= d_tiles;
  const long long mt = id % m_tiles;
  const long long item = id / m_tiles;
  const long long n = item / g.groups, grp = item % g.groups;
  const long long m0 = mt * kTile, d0 = dt * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;

  const T* gn = gout + (n * g.C_out + grp * mg) * T_;           // (Mg, T) of this item
  const T* xn = x + (n * g.C_in + grp * cg) * g.H * g.W;        // (cg, H, W) of this item

  // gout[m0:m0+32, :] and the patches of taps d0:d0+32 gathered from x, 16 output
  // positions at a time; zeros past the edges and in the padding.
  T acc[kPer][kPer];
  tile_product<kTile, kThreads, kK, kPad>(
      acc, gs, ps, T_,
      [&](int row, long long t) {
        const long long m = m0 + row;
        return (m < mg && t < T_) ? gn[m * T_ + t] : T(0);
      },
      [&](int row, long long t) {
        const long long d = d0 + row;
        if (d >= D || t >= T_) return T(0);
        const long long ci = d / taps, tap = d % taps;
        const long long ky = tap / g.kw, kx = tap % g.kw;
        const long long oy = t / g.oW, ox = t % g.oW;
        const long long iy = oy * g.sh - g.ph + ky * g.dh;
        const long long ix = ox * g.sw - g.pw + kx * g.dw;
        const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
        return inside ? xn[(ci * g.H + iy) * g.W + ix] : T(0);
      });

  T* on = out + (n * g.C_out + grp * mg) * D;  // (Mg, D) block of this item
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const long long m = m0 + ty + u * kThreads;
#pragma unroll
    for (int v = 0; v < kPer; ++v) {
      const long long d = d0 + tx + v * kThreads;
      if (m < mg && d < D) on[m * D + d] = acc[u][v];
    }
  }
}

}  // namespace

template <typename T>
cudaError_t conv2d_psg(const T* x, const T* gout, T* out, const ConvGeom& g,
                       cudaStream_t stream) {
  const long long mg = g.C_out / g.groups, D = g.C_in / g.groups * g.kh * g.kw;
  if (g.N == 0 || mg == 0 || D == 0) return cudaSuccess;
  const long long m_tiles = (mg + kTile - 1) / kTile, d_tiles = (D + kTile - 1) / kTile;
  const long long blocks = g.N * g.groups * m_tiles * d_tiles;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  conv_psg_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads, kThreads), 0, stream>>>(
      x, gout, out, g, m_tiles, d_tiles);
  return cudaGetLastError();
}

template cudaError_t conv2d_psg<float>(const float*, const float*, float*, const ConvGeom&,
                                       cudaStream_t);
template cudaError_t conv2d_psg<double>(const double*, const double*, double*, const ConvGeom&,
                                        cudaStream_t);

}  // namespace cuda
}  // namespace fastntk
