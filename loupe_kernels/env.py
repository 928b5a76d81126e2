"""``python -m loupe_kernels.env``: which backends work in this environment, and why not,
and the automatic backend choice per op, dtype and shape class (measured or provisional)."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__
from ._backends import BACKENDS, auto_table_lines, backend_status
from ._common import debug_enabled


def report() -> str:
    lines = [f"loupe_kernels {__version__}", f"python {sys.version.split()[0]} ({platform.machine()})",
             f"torch {torch.__version__} (CUDA compiled: {torch.cuda._is_compiled()}, "
             f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}, "
             f"threads: {torch.get_num_threads()})"]
    if torch.cuda.is_available():
        lines.append(f"device 0: {torch.cuda.get_device_name(0)}")
    lines.append(f"debug checks: {'on' if debug_enabled() else 'off'} (LOUPE_KERNELS_DEBUG=1: data checks raise at the "
                 f"call on GPU tensors too, at the cost of a host sync each)")
    baseline = os.environ.get("LOUPE_CPU_BASELINE_ISA", "0") == "1"
    cap = torch.backends.cpu.get_cpu_capability()
    lines.append(f"cpu kernels: {'baseline copies (LOUPE_CPU_BASELINE_ISA=1)' if baseline else 'AVX2+FMA copies where the CPU has them, picked at run time'} "
                 f"(this CPU, as torch sees it: {cap}; LOUPE_CPU_BASELINE_ISA=1 forces the baseline copies)")
    lines.append("backends:")
    for name in BACKENDS:
        st = backend_status(name)
        lines.append(f"  {name:<10} {'yes' if st.available else 'no ':<4} {st.reason}")
    lines.append("automatic choice on CPU tensors: cpu > reference")
    lines.append("automatic choice on CUDA tensors (op, dtype, shape class -> order; the first available wins):")
    lines.extend(auto_table_lines())
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
