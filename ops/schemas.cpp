// Every operator schema of the library, in one place. Backends register
// their kernels next to the kernels (csrc/*/*_cpu.cpp, *_cuda.cu), the
// Autograd kernels in autograd.cpp and the Meta kernels in meta.cpp.
#include <torch/library.h>

TORCH_LIBRARY(nanobragg, m) {
  // SPEC section 1.
  m.def(
      "tricubic_interp(Tensor grid, Tensor hkl, int[3] index_min, "
      "float default_value=0.0, str out_of_range=\"default\") -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Its first derivatives, an op of its own so that it has kernels per
  // backend and can itself be differentiated. output_mask selects
  // (grad_grid, grad_hkl); an output not asked for is not computed and comes
  // back as an empty tensor of shape [0] (a defined tensor, which autograd
  // and FakeTensor tracing both require).
  m.def(
      "tricubic_interp_backward(Tensor grad_output, Tensor grid, Tensor hkl, "
      "int[3] index_min, str out_of_range, bool[2] output_mask) "
      "-> (Tensor grad_grid, Tensor grad_hkl)",
      {at::Tag::pt2_compliant_tag});
}
