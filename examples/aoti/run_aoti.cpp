// Runs an AOTInductor package (.pt2) compiled in Python from a torch.export
// program that calls both operators (tests/python/test_export.py builds one):
// loads it with torch::inductor::AOTIModelPackageLoader and prints its
// outputs for Python to compare. Inputs are raw float32 files with their
// shapes given on the command line:
//   run_aoti model.pt2 hkl.bin N,3 pixels.bin N,3
#include <nanobragg_ops/ops.h>  // links the operators, which register on load
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

at::Tensor read_float32(const std::string& path, const std::string& shape_text) {
  std::vector<int64_t> shape;
  std::stringstream s(shape_text);
  for (std::string d; std::getline(s, d, ',');) shape.push_back(std::stoll(d));
  at::Tensor t = at::empty(shape, at::kFloat);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(t.data_ptr<float>()), t.numel() * sizeof(float));
  TORCH_CHECK(f.gcount() == static_cast<std::streamsize>(t.numel() * sizeof(float)),
              "run_aoti: ", path, " is shorter than the shape ", shape_text);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc % 2 != 0) {
    std::fprintf(stderr, "usage: run_aoti model.pt2 input.bin shape [input.bin shape ...]\n");
    return 2;
  }
  try {
    std::vector<at::Tensor> inputs;
    for (int i = 2; i + 1 < argc; i += 2) inputs.push_back(read_float32(argv[i], argv[i + 1]));
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const std::vector<at::Tensor> outputs = loader.run(inputs);
    for (const at::Tensor& out : outputs) {
      const at::Tensor v = out.to(at::kDouble).contiguous().view({-1});
      std::printf("output");
      for (int64_t i = 0; i < v.numel(); ++i) std::printf(" %.9g", v[i].item<double>());
      std::printf("\n");
    }
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "run_aoti: %s\n", e.what_without_backtrace());
    return 1;
  }
  return 0;
}
