// Runs a TorchScript module saved in Python (tests/python/test_consumers.py
// saves one that calls both operators): loads it with torch::jit::load, runs
// forward, back-propagates to its parameters, and prints the loss and every
// parameter's gradient with full precision for Python to compare.
//   run_scripted model.pt
#include <nanobragg_ops/ops.h>  // links the operators, which register on load
#include <torch/script.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: run_scripted model.pt\n");
    return 2;
  }
  try {
    torch::jit::Module module = torch::jit::load(argv[1]);
    const at::Tensor loss = module.forward({}).toTensor();
    loss.backward();
    std::printf("loss %.17g\n", loss.item<double>());
    for (const auto& p : module.named_parameters()) {
      const at::Tensor g = p.value.grad().to(at::kDouble).contiguous().view({-1});
      std::printf("grad %s", p.name.c_str());
      for (int64_t i = 0; i < g.numel(); ++i) std::printf(" %.17g", g[i].item<double>());
      std::printf("\n");
    }
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "run_scripted: %s\n", e.what_without_backtrace());
    return 1;
  }
  return 0;
}
