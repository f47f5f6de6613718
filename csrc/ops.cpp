// Registration of fastntk's ops: torch.ops.fastntk.<name> once fastntk._C is imported. The
// CPU kernels are registered here; a CUDA build adds CUDA ones in cuda/ops_cuda.cpp.
//
// A bare CPython module (no pybind11): importing it loads the library, whose static
// initialisers run the TORCH_LIBRARY registrations below.
#include <Python.h>
#include <torch/library.h>

#include "fastntk.h"

namespace {
void gram_sym_op(const at::Tensor& a, at::Tensor out, bool fp64_acc) {
  fastntk::gram_sym(a, out, fp64_acc);
}
void gram_cross_op(const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool fp64_acc) {
  fastntk::gram_cross(a, b, out, fp64_acc);
}
}  // namespace

TORCH_LIBRARY(fastntk, m) {
  m.def("gram_sym(Tensor a, Tensor(a!) out, bool fp64_acc=False) -> ()");
  m.def("gram_cross(Tensor a, Tensor b, Tensor(a!) out, bool fp64_acc=False) -> ()");
  m.def("conv2d_psg(Tensor x, Tensor gout, int kh, int kw, int sh, int sw, int ph, int pw, "
        "int dh, int dw, int groups) -> Tensor");
  m.def("affine_psg(Tensor x, Tensor g, Tensor mean) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastntk, CPU, m) {
  m.impl("gram_sym", &gram_sym_op);
  m.impl("gram_cross", &gram_cross_op);
  m.impl("conv2d_psg", &fastntk::conv2d_psg);
  m.impl("affine_psg", &fastntk::affine_psg);
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastntk CPU ops, registered as torch.ops.fastntk.{gram_sym, gram_cross, conv2d_psg, affine_psg}",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  // with_cuda: 1 when this build also registered the CUDA kernels (cuda/ops_cuda.cpp).
#ifdef FASTNTK_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
