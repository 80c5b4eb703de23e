// Every operator schema of the library, in one place. Backends register
// their kernels next to the kernels (csrc/*/*_cpu.cpp, *_cuda.cu), the
// Autograd kernels in autograd.cpp and the Meta kernels in meta.cpp.
// Each operator's three schemas follow the argument convention written in
// op_traits.h, where the operator is described once for the code that is
// generic over operators (autograd, vmap, dispatcher handles); the first
// lookup of a handle checks these schemas against that description.
#include <torch/library.h>

#include "common/library_init.h"

NANOBRAGG_LIBRARY(m) {
  // docs/CONTRACT.md §1.
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
  // Second derivatives: the backward of tricubic_interp_backward. Takes the
  // cotangents of (grad_grid, grad_hkl), either absent (None: zero), and
  // returns the gradients of (grad_output, grid, hkl) selected by
  // output_mask.
  m.def(
      "tricubic_interp_double_backward(Tensor? grad_grad_grid, "
      "Tensor? grad_grad_hkl, Tensor grad_output, Tensor grid, Tensor hkl, "
      "int[3] index_min, str out_of_range, bool[3] output_mask) "
      "-> (Tensor grad_grad_output, Tensor grad_grid, Tensor grad_hkl)",
      {at::Tag::pt2_compliant_tag});

  // docs/CONTRACT.md §2.
  m.def(
      "detector_absorption(Tensor intensity, Tensor pixel_coords, Tensor odet, "
      "Tensor thickness, Tensor attenuation_length, int thicksteps, "
      "bool oversample_thick, bool per_layer=False) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Its first derivatives; output_mask selects (intensity, pixel_coords,
  // odet, thickness, attenuation_length), shape-[0] tensors for the rest.
  m.def(
      "detector_absorption_backward(Tensor grad_output, Tensor intensity, "
      "Tensor pixel_coords, Tensor odet, Tensor thickness, "
      "Tensor attenuation_length, int thicksteps, bool oversample_thick, "
      "bool per_layer, bool[5] output_mask) -> (Tensor grad_intensity, "
      "Tensor grad_pixel_coords, Tensor grad_odet, Tensor grad_thickness, "
      "Tensor grad_attenuation_length)",
      {at::Tag::pt2_compliant_tag});
  // Second derivatives: the backward of detector_absorption_backward, from
  // the cotangents of its five outputs (None: zero), to (grad_output,
  // intensity, pixel_coords, odet, thickness, attenuation_length).
  m.def(
      "detector_absorption_double_backward(Tensor? grad_grad_intensity, "
      "Tensor? grad_grad_pixel_coords, Tensor? grad_grad_odet, "
      "Tensor? grad_grad_thickness, Tensor? grad_grad_attenuation_length, "
      "Tensor grad_output, Tensor intensity, Tensor pixel_coords, Tensor odet, "
      "Tensor thickness, Tensor attenuation_length, int thicksteps, "
      "bool oversample_thick, bool per_layer, bool[6] output_mask) -> "
      "(Tensor grad_grad_output, Tensor grad_intensity, "
      "Tensor grad_pixel_coords, Tensor grad_odet, Tensor grad_thickness, "
      "Tensor grad_attenuation_length)",
      {at::Tag::pt2_compliant_tag});
}
