// CUDA implementations of fastntk's ops (built only by a CUDA build, see setup.py):
// torch.ops.fastntk.{gram_sym, gram_cross, conv2d_psg} on CUDA tensors. The argument
// checks are the CPU ops' own (fastntk.h); the kernels are in gram.cu and conv_psg.cu.
// affine_psg has no CUDA version: on the GPU PyTorch's reductions serve it.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fastntk.h"
#include "launch.h"

namespace fastntk {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastntk.", what, " (CUDA): ", cudaGetErrorString(err));
}

void gram_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool fp64_acc,
               bool sym) {
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  const int64_t n1 = a.size(0), n2 = b.size(0), P = a.size(1);
  if (n1 == 0 || n2 == 0 || P == 0) return;
  const int64_t lda = row_stride(a), ldb = row_stride(b), ldo = row_stride(out);
  cudaError_t err;
  if (a.scalar_type() == at::kDouble) {
    err = cuda::gram<double, double, double>(a.data_ptr<double>(), lda, n1, b.data_ptr<double>(),
                                             ldb, n2, P, out.data_ptr<double>(), ldo, sym, stream);
  } else if (out.scalar_type() == at::kDouble) {
    err = cuda::gram<float, double, double>(a.data_ptr<float>(), lda, n1, b.data_ptr<float>(),
                                            ldb, n2, P, out.data_ptr<double>(), ldo, sym, stream);
  } else if (fp64_acc) {
    err = cuda::gram<float, double, float>(a.data_ptr<float>(), lda, n1, b.data_ptr<float>(), ldb,
                                           n2, P, out.data_ptr<float>(), ldo, sym, stream);
  } else {
    err = cuda::gram<float, float, float>(a.data_ptr<float>(), lda, n1, b.data_ptr<float>(), ldb,
                                          n2, P, out.data_ptr<float>(), ldo, sym, stream);
  }
  check_launch(err, sym ? "gram_sym" : "gram_cross");
}

void gram_sym_cuda(const at::Tensor& a, at::Tensor out, bool fp64_acc) {
  check_gram_args(a, nullptr, out, c10::DeviceType::CUDA);
  gram_cuda(a, a, out, fp64_acc, /*sym=*/true);
}

void gram_cross_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool fp64_acc) {
  check_gram_args(a, &b, out, c10::DeviceType::CUDA);
  gram_cuda(a, b, out, fp64_acc, /*sym=*/false);
}

at::Tensor conv2d_psg_cuda(const at::Tensor& x, const at::Tensor& gout, int64_t kh, int64_t kw,
                           int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                           int64_t groups) {
  const ConvGeom g =
      conv_geom_checked(x, gout, kh, kw, sh, sw, ph, pw, dh, dw, groups, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({g.N, g.C_out, g.C_in / groups, kh, kw}, x.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  cudaError_t err;
  if (x.scalar_type() == at::kDouble) {
    err = cuda::conv2d_psg<double>(x.data_ptr<double>(), gout.data_ptr<double>(),
                                   out.data_ptr<double>(), g, stream);
  } else {
    err = cuda::conv2d_psg<float>(x.data_ptr<float>(), gout.data_ptr<float>(),
                                  out.data_ptr<float>(), g, stream);
  }
  check_launch(err, "conv2d_psg");
  return out;
}

}  // namespace
}  // namespace fastntk

TORCH_LIBRARY_IMPL(fastntk, CUDA, m) {
  m.impl("gram_sym", &fastntk::gram_sym_cuda);
  m.impl("gram_cross", &fastntk::gram_cross_cuda);
  m.impl("conv2d_psg", &fastntk::conv2d_psg_cuda);
}
