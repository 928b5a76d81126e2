// The one binding file of the CUDA extension. CUDA kernels live in torch-free csrc/cuda/*.cu files
// (raw pointers + a small launcher declared in csrc/cuda/<op>.h); this file wraps the launchers
// for PyTorch: checks, allocation, the current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#ifndef LOUPE_TORCH_VERSION
#define LOUPE_TORCH_VERSION "unknown"
#endif

// ---- token_region_similarity (includes / wrappers) ----

// ---- shapley (includes / wrappers) ----

// ---- interaction_loss (includes / wrappers) ----

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loupe CUDA kernels";
  m.def("torch_version", []() { return std::string(LOUPE_TORCH_VERSION); });
  // ---- token_region_similarity (m.def) ----

  // ---- shapley (m.def) ----

  // ---- interaction_loss (m.def) ----
}
