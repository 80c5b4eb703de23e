// libFuzzer harness: drives both operators through their C++ entry points
// with fuzzed shapes, strides, storage offsets, dtypes, index_min near the
// int64 limits, special coordinates (NaN, +-Inf, +-1e308, denormals),
// thicksteps up to 1e5, empty and one-element tensors, forward, backward and
// double backward.
// Every call must return or throw the c10::Error of one of the operators'
// checks (its message starts "nanobragg::<op>:", as only they write it, and
// is no internal assertion); a crash, a sanitizer
// report, a hang, any other error, or a non-finite tricubic value from finite
// inputs is a failure.
#include <ATen/ATen.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <torch/autograd.h>

#include <cmath>
#include <iostream>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "nanobragg_ops/ops.h"

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int64_t kMaxNumel = 2048;

double value(FuzzedDataProvider& in, double lo = -12.0, double hi = 12.0) {
  static const double specials[] = {
      0.0,   -0.0,   1.0,      -1.0,      0.5,    -0.5, 1.5,   2.5, kNaN,        kInf,  -kInf,
      1e308, -1e308, 4.9e-324, -4.9e-324, 1e-310, 1e30, -1e30, 3.0, 7.999999999, 1e-10, -1e-10};
  if (in.ConsumeBool()) {
    return specials[in.ConsumeIntegralInRange<size_t>(0, std::size(specials) - 1)];
  }
  return in.ConsumeFloatingPointInRange<double>(lo, hi);
}

int64_t index_value(FuzzedDataProvider& in) {
  static const int64_t specials[] = {0,
                                     -3,
                                     5,
                                     -8,
                                     std::numeric_limits<int64_t>::min(),
                                     std::numeric_limits<int64_t>::max(),
                                     std::numeric_limits<int64_t>::max() - 2,
                                     std::numeric_limits<int64_t>::min() + 1,
                                     int64_t(1) << 53,
                                     -(int64_t(1) << 53)};
  if (in.ConsumeBool()) {
    return specials[in.ConsumeIntegralInRange<size_t>(0, std::size(specials) - 1)];
  }
  return in.ConsumeIntegralInRange<int64_t>(-10, 10);
}

at::ScalarType dtype(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 9)) {
    case 0:
      return at::kInt;  // an error
    case 1:
      return at::kHalf;  // an error (no half kernels)
    case 2:
    case 3:
    case 4:
      return at::kFloat;
    default:
      return at::kDouble;
  }
}

// A tensor of `shape` filled from the input, as a contiguous tensor or as a
// strided view (a stepped slice with a storage offset, a transpose, or a
// stride-0 expand of a size-1 dimension).
at::Tensor tensor(FuzzedDataProvider& in, std::vector<int64_t> shape, at::ScalarType type,
                  bool finite = false, double lo = -12.0, double hi = 12.0) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  if (numel > kMaxNumel) {
    for (auto& s : shape) s = std::min<int64_t>(s, 2);
  }
  const int layout = in.ConsumeIntegralInRange<int>(0, 3);
  std::vector<int64_t> alloc = shape;
  if (layout == 1 && !alloc.empty()) alloc[0] = alloc[0] * 2 + 1;  // stepped slice + offset
  at::Tensor base = at::empty(alloc, at::kDouble);
  double* p = base.data_ptr<double>();
  for (int64_t i = 0; i < base.numel(); ++i) {
    const double v = value(in, lo, hi);
    // `finite`: moderate values only (1e308 is finite in double, inf in float).
    p[i] = finite && !(std::abs(v) <= 1e6) ? 0.0 : v;
  }
  at::Tensor t = base.to(type);
  if (layout == 1 && !shape.empty()) {
    t = t.slice(0, 1, alloc[0], 2);
  } else if (layout == 2 && shape.size() >= 2) {
    t = t.transpose(0, static_cast<int64_t>(shape.size()) - 1)
            .contiguous()
            .transpose(0, static_cast<int64_t>(shape.size()) - 1);
  } else if (layout == 3 && !shape.empty() && shape[0] > 0) {
    t = t.narrow(0, 0, 1).expand(shape);
  }
  return t;
}

std::vector<int64_t> shape(FuzzedDataProvider& in, int max_dims, int64_t max_size) {
  std::vector<int64_t> s(in.ConsumeIntegralInRange<int>(0, max_dims));
  for (auto& d : s) d = in.ConsumeIntegralInRange<int64_t>(0, max_size);
  return s;
}

// t as a leaf that needs a gradient where its dtype can have one (an integer
// tensor cannot; the operator's dtype check then raises the error).
at::Tensor differentiable(const at::Tensor& t) {
  return t.detach().requires_grad_(at::isFloatingType(t.scalar_type()));
}

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_ops: violated: %s\n", what);
    __builtin_trap();
  }
}

void fuzz_tricubic(FuzzedDataProvider& in) {
  const at::ScalarType type = dtype(in);
  std::vector<int64_t> gshape = {in.ConsumeIntegralInRange<int64_t>(0, 9),
                                 in.ConsumeIntegralInRange<int64_t>(0, 9),
                                 in.ConsumeIntegralInRange<int64_t>(0, 9)};
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0) gshape.pop_back();  // wrong rank
  const bool finite_grid = in.ConsumeBool();
  at::Tensor grid = tensor(in, gshape, type, finite_grid, -1e3, 1e3);
  std::vector<int64_t> hshape = shape(in, 3, 6);
  hshape.push_back(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? 2 : 3);
  at::Tensor hkl =
      tensor(in, hshape, in.ConsumeIntegralInRange<int>(0, 15) == 0 ? dtype(in) : type);
  std::vector<int64_t> imin = {index_value(in), index_value(in), index_value(in)};
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0) imin.pop_back();
  const double fill = in.ConsumeBool() ? 0.0 : value(in);
  const std::string mode =
      in.ConsumeBool() ? "default" : (in.ConsumeIntegralInRange<int>(0, 7) ? "nearest" : "wrap");
  const int order = in.ConsumeIntegralInRange<int>(0, 2);  // derivatives taken
  const bool backward = order > 0;
  if (backward) {
    grid = differentiable(grid);
    hkl = differentiable(hkl);
  }
  at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, imin, fill, mode);
  require(out.sizes() == hkl.sizes().slice(0, hkl.dim() - 1), "output shape is hkl.shape[:-1]");
  // default_value is converted to the grid's dtype (-1e308 is -inf in float).
  const bool finite_fill =
      at::isfinite(at::scalar_tensor(fill, at::kDouble).to(grid.scalar_type())).item<bool>();
  if (finite_grid && finite_fill) {
    if (!at::isfinite(out).all().item<bool>()) {
      std::cerr << "grid " << grid << "\nhkl " << hkl << "\nindex_min " << at::IntArrayRef(imin)
                << " default " << fill << " " << mode << "\nout " << out << "\n";
    }
    require(at::isfinite(out).all().item<bool>(), "finite grid and default give finite values");
  }
  if (backward && out.numel() > 0) {
    auto g = torch::autograd::grad({out.sum()}, {grid, hkl}, {}, order > 1, order > 1);
    require(g[0].sizes() == grid.sizes() && g[1].sizes() == hkl.sizes(), "gradient shapes");
    if (finite_grid) {
      require(at::isfinite(g[0]).all().item<bool>(), "finite grid gradient");
    }
    if (order > 1) {
      auto gg = torch::autograd::grad({(g[0] * g[0]).sum() + (g[1] * g[1]).sum()}, {grid, hkl}, {},
                                      false, false, /*allow_unused=*/true);
      require(!gg[0].defined() || gg[0].sizes() == grid.sizes(), "second-derivative shapes");
      require(!gg[1].defined() || gg[1].sizes() == hkl.sizes(), "second-derivative shapes");
    }
  }
}

void fuzz_absorption(FuzzedDataProvider& in) {
  const at::ScalarType type = dtype(in);
  const bool per_layer = in.ConsumeBool();
  int64_t thicksteps = in.ConsumeIntegralInRange<int64_t>(-1, 6);
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0)
    thicksteps = in.ConsumeIntegralInRange<int64_t>(1, 100000);
  std::vector<int64_t> pix = shape(in, 2, 5);
  std::vector<int64_t> ishape = pix, cshape = pix;
  if (per_layer) {
    // A layer dimension of L (capped: memory), 1, or something else (an error).
    auto layers = [&] {
      const int pick = in.ConsumeIntegralInRange<int>(0, 4);
      return pick == 0 ? in.ConsumeIntegralInRange<int64_t>(0, 4)
                       : (pick == 1 ? int64_t(1)
                                    : std::min<int64_t>(std::max<int64_t>(thicksteps, 0), 64));
    };
    ishape.insert(ishape.begin(), layers());
    cshape.insert(cshape.begin(), layers());
  }
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0 && !ishape.empty()) ishape.erase(ishape.begin());
  cshape.push_back(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? 2 : 3);
  at::Tensor intensity = tensor(in, ishape, type);
  at::Tensor coords = tensor(in, cshape, type, false, -1.0, 1.0);
  at::Tensor odet =
      tensor(in, {in.ConsumeIntegralInRange<int>(0, 15) == 0 ? 2 : 3}, type, false, -1.0, 1.0);
  auto scalar = [&](double lo, double hi) {
    at::Tensor s = at::scalar_tensor(value(in, lo, hi), at::kDouble).to(type);
    return in.ConsumeIntegralInRange<int>(0, 15) == 0 ? s.reshape({1}) : s;
  };
  at::Tensor thickness = scalar(0.0, 1e-3);
  at::Tensor attenuation = scalar(1e-6, 1e-3);
  const bool oversample = in.ConsumeBool();
  const int order = in.ConsumeIntegralInRange<int>(0, 2);  // derivatives taken
  const bool backward = order > 0;
  if (backward) {
    for (at::Tensor* t : {&intensity, &coords, &odet, &thickness, &attenuation}) {
      *t = differentiable(*t);
    }
  }
  at::Tensor out = nanobragg_ops::detector_absorption(
      intensity, coords, odet, thickness, attenuation, thicksteps, oversample, per_layer);
  if (backward && out.numel() > 0) {
    const std::vector<at::Tensor> inputs = {intensity, coords, odet, thickness, attenuation};
    auto g = torch::autograd::grad({out.sum()}, inputs, {}, order > 1, order > 1);
    require(g[0].sizes() == intensity.sizes() && g[1].sizes() == coords.sizes() &&
                g[2].sizes() == odet.sizes() && g[3].dim() == 0 && g[4].dim() == 0,
            "gradients have their inputs' shapes");
    if (order > 1) {
      at::Tensor norm = at::zeros({}, out.options());
      for (const auto& gi : g) norm = norm + (gi * gi).sum();
      auto gg = torch::autograd::grad({norm}, inputs, {}, false, false, /*allow_unused=*/true);
      for (size_t i = 0; i < inputs.size(); ++i) {
        require(!gg[i].defined() || gg[i].sizes() == inputs[i].sizes(), "second-derivative shapes");
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  try {
    if (in.ConsumeBool()) {
      fuzz_tricubic(in);
    } else {
      fuzz_absorption(in);
    }
  } catch (const c10::Error& e) {
    // A clear error for bad input is the documented outcome: one of the
    // operators' own argument checks, which name the operator, never an
    // assertion or an error from deeper down.
    const std::string message = e.what_without_backtrace();
    if (message.rfind("nanobragg::", 0) != 0 ||
        message.find("INTERNAL ASSERT") != std::string::npos) {
      std::fprintf(stderr, "fuzz_ops: an error that is not an argument check: %s\n",
                   message.c_str());
      __builtin_trap();
    }
  }
  return 0;
}
