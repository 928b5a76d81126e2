"""Checks before `benchmarks/gpu.sh` builds on a fresh GPU machine (issue 20, item 4).

Each problem is printed with what to install; exit status 1 if any would stop the build or the tests:
- setuptools >= 77: pyproject.toml's ``license = "Apache-2.0"`` (PEP 639) needs it, and the build runs
  with ``--no-build-isolation`` (a fresh Python 3.11 venv has setuptools 65.5; 3.12 has none);
- ninja (the parallel build) present in this environment, and numpy, which
  ``loupe_kernels`` imports (``pip install --no-deps`` does not install it), and pytest/pytest-benchmark;
- nvcc of the same CUDA major version as torch (``torch.version.cuda``): torch's extension builder
  stops on a major mismatch.

    python benchmarks/gpu_preflight.py
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

MIN_SETUPTOOLS = (77, 0)


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def nvcc_cuda_version(nvcc_output: str) -> tuple[int, ...] | None:
    """CUDA version of ``nvcc --version``'s output ("... release 13.0, V13.0.88")."""
    m = re.search(r"release (\d+)\.(\d+)", nvcc_output)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def problems(installed: dict[str, str | None], torch_cuda: str | None, nvcc_output: str | None) -> list[str]:
    """What stops the build or the tests, from the installed versions (None = missing), torch's CUDA
    version and the output of ``nvcc --version`` (None = no nvcc)."""
    out = []
    st = installed.get("setuptools")
    if st is None or version_tuple(st) < MIN_SETUPTOOLS:
        out.append(f"setuptools {st or 'missing'}: the build needs setuptools >= 77 (license = \"Apache-2.0\" in "
                   f"pyproject.toml) and runs without build isolation: pip install 'setuptools>=77'")
    # (wheel and pybind11, also in build-system.requires, are not needed without build isolation: setuptools
    # >= 70 builds wheels itself and torch ships the pybind11 headers)
    for pkg, why in (("ninja", "the parallel CUDA compile; without it the build is serial and overruns gpu.sh's budget"),
                     ("numpy", "imported by loupe_kernels; gpu.sh installs with --no-deps"),
                     ("pytest", "runs the GPU tests"), ("pytest-benchmark", "runs the GPU benchmarks")):
        if installed.get(pkg) is None:
            out.append(f"{pkg} is not installed ({why}): pip install {pkg}")
    if torch_cuda is None:
        out.append(f"torch {installed.get('torch') or 'missing'} has no CUDA: install a CUDA build of torch")
    elif nvcc_output is None:
        out.append(f"nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): install the CUDA {torch_cuda} toolkit or "
                   f"set CUDA_HOME to it")
    else:
        nv = nvcc_cuda_version(nvcc_output)
        if nv is None:
            out.append(f"could not read nvcc's CUDA version from: {nvcc_output.strip()[-200:]}")
        elif nv[0] != version_tuple(torch_cuda)[0]:
            out.append(f"nvcc is CUDA {nv[0]}.{nv[1]} but torch was built with CUDA {torch_cuda}: torch's extension "
                       f"build stops on a major-version mismatch; set CUDA_HOME (and PATH) to a CUDA "
                       f"{version_tuple(torch_cuda)[0]}.x toolkit, or install the torch build for CUDA {nv[0]}")
    return out


def main() -> int:
    installed: dict[str, str | None] = {}
    for pkg in ("setuptools", "ninja", "numpy", "pytest", "pytest-benchmark", "torch"):
        try:
            installed[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            installed[pkg] = None
    torch_cuda = None
    if installed["torch"] is not None:
        import torch
        torch_cuda = torch.version.cuda
    nvcc = find_nvcc()
    nvcc_output = None
    if nvcc:
        nvcc_output = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = problems(installed, torch_cuda, nvcc_output)
    print(f"preflight: python {sys.version.split()[0]}, " + ", ".join(f"{k} {v}" for k, v in installed.items())
          + f", torch CUDA {torch_cuda}, nvcc {nvcc} ({nvcc_cuda_version(nvcc_output or '')})")
    for p in found:
        print("PROBLEM:", p)
    if not found:
        print("preflight: ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
