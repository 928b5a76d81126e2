// The one binding file of the CPU extension: every C++ CPU kernel is exposed here.
#include <torch/extension.h>

#include "cpu/ops.h"

#ifndef LOUPE_TORCH_VERSION
#define LOUPE_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loupe C++ CPU kernels";
  m.def("torch_version", []() { return std::string(LOUPE_TORCH_VERSION); },
        "torch version this extension was built against");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("trs_forward", &loupe::trs_forward_cpu, "token-region similarity forward (CPU)");
  m.def("trs_backward", &loupe::trs_backward_cpu, "token-region similarity backward (CPU)");
  m.def("trs_dual_forward", &loupe::trs_dual_forward_cpu,
        "token-region similarity in both directions from one score tile (CPU)");
  m.def("shapley_maxsim", &loupe::shapley_maxsim_cpu, "Shapley interaction, max-sim game (CPU)");
  m.def("shapley_coalitions", &loupe::shapley_coalitions_cpu, "coalitions of the pinned draw (CPU)");
  m.def("uil_forward", &loupe::uil_forward_cpu, "uncertainty-weighted interaction loss forward (CPU)");
  m.def("box_objectness", &loupe::box_objectness_cpu,
        "objectness logit and normalisation of every whole-patch box, forward only (CPU)");
  m.def("uil_backward", &loupe::uil_backward_cpu, "uncertainty-weighted interaction loss backward, none (CPU)");
}
