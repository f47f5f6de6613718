// Per-sample gradients of a channel-affine layer (BatchNorm's weight and bias) on the CPU,
// both from one pass over the layer input and output gradient.
//
// For sample n, channel c and the S positions of its plane:
//   sgx[n, c] = sum_s g[n, c, s] * (x[n, c, s] - mean[c])     (weight gradient / inv_std)
//   sg[n, c]  = sum_s g[n, c, s]                              (bias gradient)
// with mean of shape (C) (running statistics) or (N, C) (each sample's own statistics).
// The PyTorch path forms x - mean, then g * (x - mean), then two reductions: three
// passes over an activation-sized tensor and two activation-sized temporaries per layer.
// Here each plane is read once; products are accumulated in float64 (exact for float64
// input, one rounding at the end for float32).
#include <ATen/ops/empty.h>

#include <vector>

#include "fastntk.h"

namespace fastntk {
namespace {

template <typename T>
void affine_psg_impl(const T* x, const T* g, const T* mean, bool per_sample_mean, int64_t N,
                     int64_t C, int64_t S, T* sgx, T* sg) {
  const int64_t planes = N * C;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* xp = x + p * S;
      const T* gp = g + p * S;
      const double m = static_cast<double>(per_sample_mean ? mean[p] : mean[p % C]);
      double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
      for (int64_t s = 0; s < S; ++s) {
        const double gv = static_cast<double>(gp[s]);
        a += gv * (static_cast<double>(xp[s]) - m);
        b += gv;
      }
      sgx[p] = static_cast<T>(a);
      sg[p] = static_cast<T>(b);
    }
  });
}

}  // namespace

std::vector<at::Tensor> affine_psg(const at::Tensor& x, const at::Tensor& g,
                                   const at::Tensor& mean) {
  TORCH_CHECK(x.device().is_cpu() && g.device().is_cpu() && mean.device().is_cpu(),
              "fastntk.affine_psg: x, g and mean must be CPU tensors");
  TORCH_CHECK(x.dim() >= 2, "fastntk.affine_psg: x must be (N, C, ...), got ", x.sizes());
  TORCH_CHECK(g.sizes() == x.sizes(), "fastntk.affine_psg: g ", g.sizes(),
              " and x ", x.sizes(), " differ in shape");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastntk.affine_psg: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && mean.scalar_type() == x.scalar_type(),
              "fastntk.affine_psg: x, g and mean must share one dtype");
  TORCH_CHECK(x.is_contiguous() && g.is_contiguous() && mean.is_contiguous(),
              "fastntk.affine_psg: x, g and mean must be contiguous");
  const int64_t N = x.size(0), C = x.size(1), S = C ? x.numel() / std::max<int64_t>(1, N * C) : 0;
  const bool per_sample = mean.dim() == 2;
  TORCH_CHECK((mean.dim() == 1 && mean.size(0) == C) ||
                  (per_sample && mean.size(0) == N && mean.size(1) == C),
              "fastntk.affine_psg: mean must be (C,) or (N, C) with C=", C, ", N=", N,
              "; got ", mean.sizes());
  at::Tensor sgx = at::empty({N, C}, x.options());
  at::Tensor sg = at::empty({N, C}, x.options());
  if (N * C == 0) return {sgx, sg};
  if (x.scalar_type() == at::kDouble) {
    affine_psg_impl<double>(x.data_ptr<double>(), g.data_ptr<double>(), mean.data_ptr<double>(),
                            per_sample, N, C, S, sgx.data_ptr<double>(), sg.data_ptr<double>());
  } else {
    affine_psg_impl<float>(x.data_ptr<float>(), g.data_ptr<float>(), mean.data_ptr<float>(),
                           per_sample, N, C, S, sgx.data_ptr<float>(), sg.data_ptr<float>());
  }
  return {sgx, sg};
}

}  // namespace fastntk
