#include "workloads.h"

#include <ATen/Parallel.h>
#include <nanobragg_ops/ops.h>

#include <algorithm>
#include <cmath>

namespace nanobragg_bench {
namespace {

// Rotation about a unit axis by angle (radians), [3, 3] double.
at::Tensor rotation(std::array<double, 3> axis, double angle) {
  const double n = std::sqrt(axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]);
  const double x = axis[0] / n, y = axis[1] / n, z = axis[2] / n;
  const double c = std::cos(angle), s = std::sin(angle), t = 1 - c;
  return at::tensor(
             {t * x * x + c, t * x * y - s * z, t * x * z + s * y, t * x * y + s * z, t * y * y + c,
              t * y * z - s * x, t * x * z - s * y, t * y * z + s * x, t * z * z + c},
             at::kDouble)
      .view({3, 3});
}

// Pixel centres of a size x size detector, 0.1 mm pixels, at 100 mm along
// the beam (+z), in metres, float64 on `device`.
at::Tensor detector_pixels(int64_t size, const at::Device& device) {
  const double pixel = 1e-4, distance = 0.1;
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor c = (at::arange(size, f64) - (size - 1) / 2.0) * pixel;
  at::Tensor y = c.view({size, 1}).expand({size, size});
  at::Tensor x = c.view({1, size}).expand({size, size});
  return at::stack({x, y, at::full({size, size}, distance, f64)}, -1);
}

}  // namespace

TricubicInputs make_tricubic_inputs(int64_t size, int64_t per_pixel, const at::TensorOptions& opts,
                                    double cell) {
  at::manual_seed(7);
  TricubicInputs in;
  const int64_t lowest_index = -kGridSide / 2;  // h, k, l in [-32, 31]
  in.index_min = {lowest_index, lowest_index, lowest_index};
  // Structure factors: a Wilson-like fall-off with random amplitudes, drawn
  // on the CPU so that every device gets the same grid.
  at::Tensor idx = at::arange(lowest_index, lowest_index + kGridSide, at::kDouble);
  at::Tensor r2 = idx.view({kGridSide, 1, 1}).pow(2) + idx.view({1, kGridSide, 1}).pow(2) +
                  idx.view({1, 1, kGridSide}).pow(2);
  at::Tensor grid =
      100 * at::exp(-r2 / 800) * (0.5 + at::rand({kGridSide, kGridSide, kGridSide}, at::kDouble));

  // The Miller indices are computed in float64 where they will live: at
  // 2048² × 9 that is 37.7 M points, seconds of CPU time per process (and
  // the bench's memory children each build them again).
  const at::Device device = opts.device();
  const double wavelength = 1.0;  // A
  at::Tensor p = detector_pixels(size, device).view({-1, 3});
  at::Tensor s = p / p.norm(2, -1, true);
  at::Tensor q =
      (s - at::tensor({0.0, 0.0, 1.0}, at::kDouble).to(device)) / wavelength;  // [P, 3], 1/A
  at::Tensor U = rotation({0.3, -0.5, 0.8}, 0.7);
  std::vector<at::Tensor> domains;
  for (int64_t d = 0; d < per_pixel; ++d) {
    at::Tensor mosaic = d == 0 ? at::eye(3, at::kDouble)
                               : rotation({std::cos(d * 1.3), std::sin(d * 2.1), 0.4}, 0.005 * d);
    domains.push_back(cell * at::matmul(q, at::matmul(mosaic, U).t().to(device)));
  }
  // Pixel-major order: the lookups of one pixel are neighbours in memory,
  // and neighbouring pixels have neighbouring hkl, as a detector gives.
  at::Tensor hkl = at::stack(domains, 1).reshape({-1, 3});
  in.grid = grid.to(opts);
  in.hkl = hkl.to(opts);
  in.grid_sample_input = in.grid.view({1, 1, kGridSide, kGridSide, kGridSide});
  in.grid_sample_coords = grid_sample_coords(hkl, in.index_min, in.grid.sizes()).to(opts);
  return in;
}

at::Tensor grid_sample_coords(const at::Tensor& hkl, const std::array<int64_t, 3>& index_min,
                              at::IntArrayRef grid_sizes) {
  // align_corners=true maps -1 and 1 to the first and last node; the last
  // coordinate indexes the last (l) dimension, hence the flip.
  const at::Tensor lo =
      at::tensor({double(index_min[0]), double(index_min[1]), double(index_min[2])}, at::kDouble)
          .to(hkl.device());
  const at::Tensor span =
      at::tensor({double(grid_sizes[0] - 1), double(grid_sizes[1] - 1), double(grid_sizes[2] - 1)},
                 at::kDouble)
          .to(hkl.device());
  const at::Tensor norm = 2 * (hkl.to(at::kDouble) - lo) / span - 1;
  return norm.flip(-1).contiguous().view({1, -1, 1, 1, 3});
}

at::Tensor points_per_cell(const at::Tensor& hkl, const std::array<int64_t, 3>& index_min,
                           at::IntArrayRef grid_sizes) {
  TORCH_CHECK(
      grid_sizes.size() == 3 && grid_sizes[0] >= 4 && grid_sizes[1] >= 4 && grid_sizes[2] >= 4,
      "points_per_cell: a grid of at least 4 nodes per axis, got ", grid_sizes);
  const int64_t cells[3] = {grid_sizes[0] - 3, grid_sizes[1] - 3, grid_sizes[2] - 3};
  // A stencil starts one node below floor(x) and ends two above it. The
  // range test in float64, before any integer conversion, so that NaN, Inf
  // and huge indices are outside rather than wrapped.
  const at::Tensor first = at::floor(hkl.to(at::kDouble)) - 1;
  at::Tensor inside = at::ones({hkl.size(0)}, hkl.options().dtype(at::kBool));
  for (int d = 0; d < 3; ++d) {
    const at::Tensor f = first.select(1, d) - double(index_min[d]);
    inside = inside & (f >= 0) & (f < double(cells[d]));
  }
  const at::Tensor start = first.index({inside}).to(at::kLong);  // [M, 3], in range
  at::Tensor cell = at::zeros({start.size(0)}, start.options());
  for (int d = 0; d < 3; ++d) cell = cell * cells[d] + (start.select(1, d) - index_min[d]);
  const int64_t num_cells = cells[0] * cells[1] * cells[2];
  return at::bincount(cell, {}, num_cells).view({cells[0], cells[1], cells[2]});
}

namespace {

// x [C0, C1, C2] per stencil start summed over the 4×4×4 nodes each stencil
// covers: [C0 + 3, C1 + 3, C2 + 3] per node.
at::Tensor spread_over_stencils(const at::Tensor& x) {
  const int64_t c0 = x.size(0), c1 = x.size(1), c2 = x.size(2);
  at::Tensor out = at::zeros({c0 + 3, c1 + 3, c2 + 3}, x.options());
  for (int64_t a = 0; a < 4; ++a) {
    for (int64_t b = 0; b < 4; ++b) {
      for (int64_t c = 0; c < 4; ++c) {
        out.slice(0, a, a + c0).slice(1, b, b + c1).slice(2, c, c + c2).add_(x);
      }
    }
  }
  return out;
}

}  // namespace

GridGradientWork grid_gradient_work(const at::Tensor& cell_counts) {
  TORCH_CHECK(cell_counts.dim() == 3, "grid_gradient_work: [C0, C1, C2] counts");
  const at::Tensor counts = cell_counts.to(at::kLong);
  // Each start's run of sorted positions [begin, end): runs in key order,
  // the cells' linear order (points outside the grid sort last).
  const at::Tensor flat = counts.reshape({-1});
  const at::Tensor end = at::cumsum(flat, 0);
  const at::Tensor begin = end - flat;
  const int64_t span = kGatherPieceSpan, lanes = kGatherLanes;
  auto ceil_div = [](const at::Tensor& x, int64_t d) { return at::floor_divide(x + (d - 1), d); };
  const at::Tensor used = flat > 0;
  const at::Tensor last = at::floor_divide((end - 1).clamp_min(0), span);
  const at::Tensor pieces = at::where(used, last - at::floor_divide(begin, span) + 1, 0);
  // The first piece, and the last where there are two or more; the middle
  // ones are whole spans.
  const at::Tensor first_len = at::minimum(end, (at::floor_divide(begin, span) + 1) * span) - begin;
  const at::Tensor last_len = end - last * span;
  const at::Tensor cut = pieces >= 2;
  const at::Tensor first_long = used & (first_len >= lanes);
  const at::Tensor last_long = cut & (last_len >= lanes);
  const at::Tensor short_pieces =
      (used & ~first_long).to(at::kLong) + (cut & ~last_long).to(at::kLong);
  const at::Tensor long_pieces = pieces - short_pieces;
  const at::Tensor middle = (pieces - 2).clamp_min(0);
  const at::Tensor table = at::where(first_long, ceil_div(first_len, lanes), 0) +
                           middle * (span / lanes) +
                           at::where(last_long, ceil_div(last_len, lanes), 0);
  // A node's taps: the points of every cell whose stencil covers it. Its
  // warp's iterations: per covering start, its long pieces' table rows 32
  // at a time, and one per short piece (tricubic_math.h, run_lane_sum).
  const at::Tensor per_start = (ceil_div(long_pieces, lanes) + short_pieces).view(counts.sizes());
  const at::Tensor taps = spread_over_stencils(counts);
  const at::Tensor iterations = spread_over_stencils(per_start);
  GridGradientWork w;
  w.points_inside = counts.sum().item<int64_t>();
  TORCH_CHECK(taps.sum().item<int64_t>() == 64 * w.points_inside,
              "grid_gradient_work: every point's 64 taps must land on a node");
  w.cells_used = used.sum().item<int64_t>();
  w.most_points_in_a_cell = counts.numel() > 0 ? counts.max().item<int64_t>() : 0;
  w.nodes_with_taps = (taps > 0).sum().item<int64_t>();
  w.table_iterations = table.sum().item<int64_t>();
  w.gather_iterations = iterations.sum().item<int64_t>();
  w.busiest_node_iterations = iterations.numel() > 0 ? iterations.max().item<int64_t>() : 0;
  w.busiest_node_taps = taps.numel() > 0 ? taps.max().item<int64_t>() : 0;
  return w;
}

AbsorptionInputs make_absorption_inputs(int64_t size, const at::TensorOptions& opts) {
  at::manual_seed(11);
  AbsorptionInputs in;
  in.intensity = (at::rand({size, size}, at::kDouble) * 1000).to(opts);  // drawn on the CPU
  in.pixel_coords = detector_pixels(size, opts.device()).to(opts);
  at::Tensor odet = at::tensor({0.02, -0.01, 1.0}, at::kDouble);
  in.odet = (odet / odet.norm()).to(opts);
  in.thickness = at::scalar_tensor(450e-6, opts);
  in.attenuation_length = at::scalar_tensor(234e-6, opts);
  return in;
}

// ---------------------------------------------------------------------------
// scalar_reference: compiled once per CPU capability (scalar_reference.cpp),
// the build the library itself runs chosen.

std::string scalar_reference_capability() {
#if NANOBRAGG_BENCH_HAVE_AVX_BUILDS
  return nanobragg_ops::cpu_capability();
#else
  return "default";
#endif
}

at::Tensor tricubic_scalar_reference(const TricubicInputs& in) {
#if NANOBRAGG_BENCH_HAVE_AVX_BUILDS
  const std::string cap = scalar_reference_capability();
  if (cap == "avx512") return AVX512::tricubic_scalar_reference(in);
  if (cap == "avx2") return AVX2::tricubic_scalar_reference(in);
#endif
  return DEFAULT::tricubic_scalar_reference(in);
}

at::Tensor absorption_scalar_reference(const AbsorptionInputs& in) {
#if NANOBRAGG_BENCH_HAVE_AVX_BUILDS
  const std::string cap = scalar_reference_capability();
  if (cap == "avx512") return AVX512::absorption_scalar_reference(in);
  if (cap == "avx2") return AVX2::absorption_scalar_reference(in);
#endif
  return DEFAULT::absorption_scalar_reference(in);
}

// ---------------------------------------------------------------------------
// aten_composite

namespace {

// The 4 Lagrange weights of nodes n-1..n+2 at u, as a [N, 4] tensor.
at::Tensor lagrange_weights(const at::Tensor& u) {
  return at::stack({-u * (u - 1) * (u - 2) / 6, (u + 1) * (u - 1) * (u - 2) / 2,
                    -(u + 1) * u * (u - 2) / 2, (u + 1) * u * (u - 1) / 6},
                   -1);
}

}  // namespace

at::Tensor tricubic_aten_composite(const at::Tensor& grid, const at::Tensor& hkl,
                                   const std::array<int64_t, 3>& index_min) {
  const at::Tensor n = at::floor(hkl.detach());
  const at::Tensor u = hkl - n;
  const at::Tensor offsets = at::arange(-1, 3, hkl.options().dtype(at::kLong));
  at::Tensor inside = at::ones({hkl.size(0)}, hkl.options().dtype(at::kBool));
  std::array<at::Tensor, 3> idx;
  for (int d = 0; d < 3; ++d) {
    const at::Tensor first = n.select(1, d).to(at::kLong) - index_min[d];
    inside = inside & (first - 1 >= 0) & (first + 2 <= grid.size(d) - 1);
    idx[d] = (first.unsqueeze(1) + offsets).clamp(0, grid.size(d) - 1);  // [N, 4]
  }
  // [N, 4, 4, 4] neighbourhood by advanced indexing.
  const at::Tensor sub = grid.index(
      {idx[0].view({-1, 4, 1, 1}), idx[1].view({-1, 1, 4, 1}), idx[2].view({-1, 1, 1, 4})});
  const at::Tensor wh = lagrange_weights(u.select(1, 0));
  const at::Tensor wk = lagrange_weights(u.select(1, 1));
  const at::Tensor wl = lagrange_weights(u.select(1, 2));
  const at::Tensor value = at::einsum("na,nb,nc,nabc->n", {wh, wk, wl, sub});
  return at::where(inside, value, at::zeros_like(value));
}

// What the composite holds at the peak of its forward+backward, per point,
// with s = element size (float32: 4), from the code above:
//
// forward graph, alive when it returns and kept for the backward:
//   u (the fractional part, saved by the weights' products)      3 s
//   inside mask (saved by where)                                  1 B
//   idx: three [4] int64 index rows (saved by index)             96 B
//   sub: the gathered [4,4,4] neighbourhood (saved by einsum)    64 s
//   einsum's outer products wh (x) wk [4,4] and (x) wl [4,4,4]   80 s
//   Lagrange weights: per axis 14 factors saved by the muls
//     and the stacked [4] weights, 3 axes                        54 s
//   output                                                        1 s
//   = 202 s + 97 B
// backward, at its peak (the backward of the [4,4,4] outer product):
//   - sub and the outer product, released by the bmm's backward  -128 s
//   + sub's gradient, waiting for the index backward             +64 s
//   + the outer product's incoming gradient                      +64 s
//   + grad * other for both factors, alive together before
//     the engine reduces them (sum_to)                          +128 s
//   + those reductions, [4,4] and [4]                            +20 s
//   = +148 s
// peak = 350 s + 97 B per point: 1497 B in float32, 2897 B in float64.
// Measured by the bench's memory child at 2^20 float32 points: 1480 B per
// point with MALLOC_MMAP_THRESHOLD_=131072 (every block of 128 KiB or more
// mmapped and unmapped when freed, so the resident set follows allocations);
// 1613 B with glibc's defaults, where freed blocks of a few MiB stay resident.
// At 37.7 M points every block is far above glibc's mmap threshold.
// Forward alone, without gradients: at most the forward graph above
// (202 s + 97 B), since its intermediates are then freed as it goes.
//
// On CUDA the gather's backward is another algorithm (index_put_ with
// accumulate sorts the [N, 4, 4, 4] int64 linear indices, copies of 512
// bytes per point each), so the bench also extrapolates from the peaks it
// measured at smaller sizes in the same run (main.cpp, estimated_peak).
int64_t tricubic_aten_composite_peak_bytes(int64_t n, int64_t element_size, bool backward) {
  return n * ((backward ? 350 : 202) * element_size + 97);
}

at::Tensor absorption_aten_composite(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                     const at::Tensor& odet, const at::Tensor& thickness,
                                     const at::Tensor& attenuation_length, int64_t thicksteps,
                                     bool oversample_thick) {
  const at::Tensor dist = pixel_coords.norm(2, -1, true).clamp_min(1e-10);
  at::Tensor parallax = (pixel_coords / dist * odet).sum(-1);
  parallax = at::where(
      parallax.abs() < 1e-10,
      at::where(parallax < 0, at::full_like(parallax, -1e-10), at::full_like(parallax, 1e-10)),
      parallax);
  const at::Tensor dz = thickness / thicksteps;
  const at::Tensor mu = 1 / attenuation_length;
  const at::Tensor t = at::arange(thicksteps, intensity.options()).view({-1, 1, 1});
  const at::Tensor capture =
      at::exp(-t * dz * mu / parallax) - at::exp(-(t + 1) * dz * mu / parallax);  // [L, S, F]
  return oversample_thick ? intensity * capture.sum(0) : intensity * capture[thicksteps - 1];
}

double relative_difference(const at::Tensor& got, const at::Tensor& ref) {
  TORCH_CHECK(got.device() == ref.device(), "result on ", got.device(), ", the fused op's on ",
              ref.device());
  TORCH_CHECK(got.numel() == ref.numel(), "result of ", got.numel(), " elements, the fused op's ",
              ref.numel());
  if (ref.numel() == 0) return 0.0;
  const at::Tensor r = ref.detach().to(at::kDouble).reshape({-1});
  const at::Tensor g = got.detach().to(at::kDouble).reshape({-1});
  const double scale = r.abs().max().item<double>();
  const double diff = (g - r).abs().max().item<double>();
  return scale > 0 ? diff / scale : diff;
}

double check_tolerance(at::ScalarType dtype) {
  return dtype == at::kDouble ? 1e-9 : 1e-3;
}

at::Tensor grid_sample_trilinear(const at::Tensor& input, const at::Tensor& coords) {
  return at::grid_sampler(input, coords, /*interpolation_mode=*/0, /*padding_mode=*/0,
                          /*align_corners=*/true);
}

int64_t grid_sample_parts(int64_t n, int64_t threads) {
  for (int64_t parts = std::max<int64_t>(threads, 1); parts > 1; --parts) {
    if (n % parts == 0) return parts;
  }
  return 1;
}

}  // namespace nanobragg_bench
