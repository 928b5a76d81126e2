"""Build script: the C++ CPU extension always, the CUDA extension where torch has CUDA and nvcc exists.

Environment switches:
  LOUPE_SKIP_CUDA=1     never build the CUDA extension
  LOUPE_CUDA_ARCHS      e.g. "90" or "80;90" (default "90"): the SM targets of the CUDA extension
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_VERSION = torch.__version__.split("+")[0]


def _cxx_std():
    """torch >= 2.14 headers need C++20; older ones build with C++17 (and older nvcc lack C++20)."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def cpu_extension():
    sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))) + ["csrc/bind_cpu.cpp"]
    return cpp_extension.CppExtension(
        name="loupe_kernels._cpu",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("LOUPE_TORCH_VERSION", f'"{TORCH_VERSION}"')],
        extra_compile_args=["-O3", "-fopenmp", _cxx_std()],
        extra_link_args=["-fopenmp"],
    )


def cuda_extension():
    """The CUDA kernels are torch-free .cu files; one .cpp binds them."""
    if os.environ.get("LOUPE_SKIP_CUDA", "0") == "1":
        print("loupe: LOUPE_SKIP_CUDA=1, not building the CUDA extension")
        return None
    if not torch.cuda._is_compiled():
        print("loupe: this torch has no CUDA, not building the CUDA extension")
        return None
    if cpp_extension.CUDA_HOME is None:
        print("loupe: nvcc / CUDA_HOME not found, not building the CUDA extension")
        return None
    cu = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    if not cu or not os.path.exists(os.path.join(HERE, "csrc", "bind_cuda.cpp")):
        print("loupe: no CUDA kernels in csrc/cuda yet, not building the CUDA extension")
        return None
    archs = os.environ.get("LOUPE_CUDA_ARCHS", "90").replace(",", ";").split(";")
    gencode = []
    for a in filter(None, (x.strip() for x in archs)):
        gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    return cpp_extension.CUDAExtension(
        name="loupe_kernels._cuda",
        sources=["csrc/bind_cuda.cpp"] + cu,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("LOUPE_TORCH_VERSION", f'"{TORCH_VERSION}"')],
        extra_compile_args={"cxx": ["-O3", _cxx_std()],
                            "nvcc": ["-O3", _cxx_std(), "-lineinfo"] + gencode},
    )


ext_modules = [cpu_extension()]
cuda = cuda_extension()
if cuda is not None:
    ext_modules.append(cuda)

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
