// What the bench driver times: realistic inputs and the three baselines that
// the fused operators are measured against (docs/CONTRACT.md §5).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <string>

namespace nanobragg_bench {

// An HKL grid of structure factors and Miller indices from a real detector
// geometry: a 50 A cubic cell in a general orientation, 1 A X-rays, a
// size x size detector of 0.1 mm pixels at 100 mm, and `per_pixel` lookups
// per pixel (mosaic domains: small random rotations of the crystal).
struct TricubicInputs {
  at::Tensor grid;  // [64, 64, 64], h, k, l in [-32, 31]
  at::Tensor hkl;   // [size * size * per_pixel, 3]
  std::array<int64_t, 3> index_min;
  at::Tensor grid_sample_input;   // grid as [1, 1, Nh, Nk, Nl]
  at::Tensor grid_sample_coords;  // hkl normalised to [-1, 1], [1, N, 1, 1, 3]
};

constexpr int64_t kGridSide = 64;  // TricubicInputs::grid's nodes per axis
constexpr int64_t kGridNodes = kGridSide * kGridSide * kGridSide;

// `cell` (A) sets how far the detector reaches in hkl: with the default
// 50 A, a 2048² detector (2θ up to 55°) reaches |h| ≈ 46, so part of it
// falls outside the 64³ grid (those lookups cost no taps); with 30 A every
// lookup of a 2048² detector is inside.
TricubicInputs make_tricubic_inputs(int64_t size, int64_t per_pixel, const at::TensorOptions& opts,
                                    double cell = 50.0);

// How a grid gradient's taps spread over the grid's nodes, for the two ways
// the CUDA kernels add them (tricubic_cuda.cu, tricubic_math.h): the
// deterministic path sorts the points by stencil start, cuts each start's
// run of points into pieces at every kPieceSpan-th sorted position, has one
// warp sum each piece of 32 points or more into a table row (32 points per
// iteration), and gives each node one warp, whose lanes take the table rows
// of the 64 covering starts' runs 32 at a time and the points of their
// short pieces (fewer than 32: a run's first and last piece) one each; the
// atomic path adds each tap at its node's address, one add after another
// where they meet. Counted from the points' stencils, not timed: it says
// where the time can go (the GPU goals' grid-gradient rows carry it beside
// their times).
struct GridGradientWork {
  int64_t points_inside = 0;            // points whose 4×4×4 stencil is inside the grid
  int64_t cells_used = 0;               // distinct stencil starts among them
  int64_t most_points_in_a_cell = 0;    // points sharing one stencil start, at most
  int64_t nodes_with_taps = 0;          // nodes some stencil covers
  int64_t table_iterations = 0;         // the piece table's warp iterations, all pieces
  int64_t gather_iterations = 0;        // all nodes' warp iterations: per node, over the runs
                                        // of its 64 stencils, ceil(long pieces / 32) + short ones
  int64_t busiest_node_iterations = 0;  // the most one node's warp takes
  int64_t busiest_node_taps = 0;        // the atomic path's adds to its hottest address

  // The busiest node's iterations over an even share of all nodes' among
  // `resident_warps`, the warps the device runs at once (0 with no work).
  double busiest_over_fair_share(double resident_warps) const {
    const double fair = double(gather_iterations) / resident_warps;
    return fair > 0 ? double(busiest_node_iterations) / fair : 0.0;
  }
};
constexpr int64_t kGatherLanes = 32;  // a warp: the lanes that share one node's taps
// tricubic_math.h's kPieceSpan (the bench sees only the public API): the
// sorted positions at which runs are cut into pieces.
constexpr int64_t kGatherPieceSpan = 1024;

// Points per stencil start, [S0 - 3, S1 - 3, S2 - 3] int64 on hkl's device,
// for a grid of `grid_sizes` whose first node is index_min; points whose
// stencil leaves the grid are not counted (they add no taps).
at::Tensor points_per_cell(const at::Tensor& hkl, const std::array<int64_t, 3>& index_min,
                           at::IntArrayRef grid_sizes);
// The work of the grid gradient of points counted per stencil start.
GridGradientWork grid_gradient_work(const at::Tensor& cell_counts);

// grid_sample's [1, N, 1, 1, 3] coordinates (align_corners=true) of the
// points hkl [N, 3] in a grid of `grid_sizes` whose first node is index_min.
at::Tensor grid_sample_coords(const at::Tensor& hkl, const std::array<int64_t, 3>& index_min,
                              at::IntArrayRef grid_sizes);

// A size x size image on the same detector, pixel positions in metres,
// a 450 um sensor with a 234 um attenuation length, 5 layers.
struct AbsorptionInputs {
  at::Tensor intensity;                      // [size, size]
  at::Tensor pixel_coords;                   // [size, size, 3]
  at::Tensor odet;                           // [3], slightly tilted
  at::Tensor thickness, attenuation_length;  // 0-dim
  int64_t thicksteps = 5;
  bool oversample_thick = true;
};

AbsorptionInputs make_absorption_inputs(int64_t size, const at::TensorOptions& opts);

// scalar_reference: a straightforward per-point loop in the style of
// nanoBragg (polin3's 21 polint calls; the absorption loop over layers),
// parallel over points with at::parallel_for as nanoBragg is with OpenMP.
// Built once per CPU capability (scalar_reference.cpp) with the library's
// flags for it, run at the capability the library runs (its
// cpu_capability()): scalar_reference_capability() says which.
at::Tensor tricubic_scalar_reference(const TricubicInputs& in);
at::Tensor absorption_scalar_reference(const AbsorptionInputs& in);
std::string scalar_reference_capability();
#define NANOBRAGG_BENCH_SCALAR_REFERENCE(cap)                         \
  namespace cap {                                                     \
  at::Tensor tricubic_scalar_reference(const TricubicInputs& in);     \
  at::Tensor absorption_scalar_reference(const AbsorptionInputs& in); \
  }
NANOBRAGG_BENCH_SCALAR_REFERENCE(DEFAULT)
NANOBRAGG_BENCH_SCALAR_REFERENCE(AVX2)
NANOBRAGG_BENCH_SCALAR_REFERENCE(AVX512)
#undef NANOBRAGG_BENCH_SCALAR_REFERENCE

// aten_composite: the PyTorch port's vectorised formulation with ATen ops
// (a gathered [N, 4, 4, 4] neighbourhood and Lagrange weights as tensors;
// absorption as [L, S, F] broadcast capture fractions); autograd gives its
// backward.
at::Tensor tricubic_aten_composite(const at::Tensor& grid, const at::Tensor& hkl,
                                   const std::array<int64_t, 3>& index_min);
// Peak extra memory of tricubic_aten_composite's forward+backward over n
// points of `element_size`-byte floats, counted from its code (workloads.cpp):
// 350 elements + 97 bytes per point; its forward alone (backward = false):
// at most 202 elements + 97 bytes. The bench decides from it, before
// running, whether the composite fits in memory.
int64_t tricubic_aten_composite_peak_bytes(int64_t n, int64_t element_size, bool backward = true);

at::Tensor absorption_aten_composite(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                     const at::Tensor& odet, const at::Tensor& thickness,
                                     const at::Tensor& attenuation_length, int64_t thicksteps,
                                     bool oversample_thick);

// grid_sample_trilinear: at::grid_sampler in 3-D trilinear mode at the same
// points (8 taps to our 64), a built-in reference for a gather-bound op.
at::Tensor grid_sample_trilinear(const at::Tensor& input, const at::Tensor& coords);

// How many batch entries grid_sample_split cuts n points into: the most,
// up to `threads`, that divide n (ATen's CPU grid_sampler runs one batch
// entry per thread).
int64_t grid_sample_parts(int64_t n, int64_t threads);

// How far a result is from the fused op's (the bench checks each baseline
// before timing it): the largest |got - ref| over the largest |ref|,
// computed in float64 on the tensors' device, so that the check's own
// rounding does not count; NaN anywhere gives NaN. Throws if the shapes or
// devices differ.
double relative_difference(const at::Tensor& got, const at::Tensor& ref);

// What relative_difference may reach for results computed in `dtype`:
// rounding, even accumulated over the thousands of points summed into one
// node of a grid gradient, stays far below it, while a wrong point, axis,
// weight or layer gives differences of order one.
double check_tolerance(at::ScalarType dtype);

}  // namespace nanobragg_bench
