"""benchmarks/gpu_preflight.py: the checks gpu.sh runs before building on a fresh GPU machine."""
from __future__ import annotations

import importlib.util
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_preflight.py"
spec = importlib.util.spec_from_file_location("loupe_gpu_preflight", PATH)
pf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pf)

OK = {"setuptools": "80.9.0", "ninja": "1.13", "numpy": "2.3",
      "pytest": "9.0", "pytest-benchmark": "5.1", "torch": "2.11.0+cu130"}
NVCC13 = "Cuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n"


def test_a_complete_environment_passes():
    assert pf.problems(OK, "13.0", NVCC13) == []


def test_each_problem_says_what_to_install():
    p = pf.problems({**OK, "setuptools": "65.5.0", "numpy": None}, "12.8", NVCC13)
    assert len(p) == 3
    assert "setuptools>=77" in p[0] and "numpy" in p[1] and "pip install numpy" in p[1]
    assert "CUDA 13.0" in p[2] and "CUDA 12.8" in p[2] and "CUDA_HOME" in p[2]
    assert any("nvcc not found" in x for x in pf.problems(OK, "13.0", None))
    assert any("has no CUDA" in x for x in pf.problems(OK, None, NVCC13))
    assert pf.problems(OK, "13.2", NVCC13) == []  # minor versions may differ


def test_runs_here():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(PATH)], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1) and "preflight:" in out.stdout, out.stderr[-2000:]
