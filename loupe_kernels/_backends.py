"""Backend discovery and dispatch shared by every op.

Backends: ``cuda`` (compiled CUDA extension), ``triton`` (Triton kernels), ``cpu`` (compiled C++
extension) and ``reference`` (plain PyTorch). Automatic choice: CPU tensors -> cpu > reference;
CUDA tensors -> cuda > triton > reference. The Triton interpreter (``TRITON_INTERPRET=1``) is
used only when ``backend="triton"`` is asked for explicitly on CPU tensors.

A missing, broken or mismatched extension never breaks the import: the backend is marked
unavailable with the reason, and the first automatic fallback warns once.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str
    module: object | None = None


def _torch_mm(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _load_extension(modname: str) -> BackendStatus:
    name = modname.rsplit("_", 1)[-1]
    try:
        mod = importlib.import_module(f"loupe_kernels.{modname}")
    except ImportError as e:  # not built, or built against another torch (undefined symbols)
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        if "No module named" in msg:
            reason = f"extension loupe_kernels.{modname} is not built (reinstall with `pip install .`)"
        else:
            reason = (f"extension loupe_kernels.{modname} failed to load ({msg}); it was probably "
                      f"built against another torch than the running {torch.__version__}: rebuild it")
        return BackendStatus(name, False, reason)
    except Exception as e:  # noqa: BLE001 - importing must never crash
        return BackendStatus(name, False, f"extension loupe_kernels.{modname} failed to load: {e!r}")
    built = getattr(mod, "torch_version", lambda: "unknown")()
    if _torch_mm(built) != _torch_mm(torch.__version__):
        return BackendStatus(name, False, f"extension built against torch {built}, running "
                                          f"{torch.__version__}: rebuild with `pip install --no-build-isolation .`")
    return BackendStatus(name, True, f"compiled extension (built against torch {built})", mod)


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, "plain PyTorch")
    if name == "cpu":
        return _load_extension("_cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            st = _load_extension("_cuda")
            why = "no CUDA device" if st.available else st.reason
            return BackendStatus(name, False, why)
        return _load_extension("_cuda")
    if name == "triton":
        # found, not imported: the kernels import triton lazily (TRITON_INTERPRET is read at import)
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(name, False, "triton is not installed (pip install triton)")
        try:
            version = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        if torch.cuda.is_available():
            return BackendStatus(name, True, f"triton {version} on CUDA")
        if _triton_interpreter():
            return BackendStatus(name, True, f"triton {version} interpreter (TRITON_INTERPRET=1, CPU tensors)")
        return BackendStatus(name, False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton "
                                          "to run the Triton interpreter on CPU tensors)")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


# Probed once at import, so that dispatch under torch.compile only reads a dict.
_STATUS: dict[str, BackendStatus] = {name: _probe(name) for name in BACKENDS}


def backend_status(name: str) -> BackendStatus:
    """Whether backend ``name`` works in this process, and why not."""
    if name not in _STATUS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return _STATUS[name]


def available_backends() -> list[str]:
    """Names of the backends that work in this process, in preference order."""
    return [b for b in BACKENDS if backend_status(b).available]


def extension(name: str):
    """The compiled module of ``cpu`` or ``cuda`` (raises if unavailable)."""
    st = backend_status(name)
    if not st.available:
        raise RuntimeError(f"backend {name!r} is unavailable: {st.reason}")
    return st.module


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve_backend(op: str, backend: str | None, device: torch.device,
                    supported: Iterable[str]) -> str:
    """Pick the backend for one call of ``op`` on tensors on ``device``.

    ``supported`` are the backends that implement this op. An explicit ``backend`` must be known,
    implemented and available (ValueError otherwise); ``None`` picks automatically.
    """
    supported = tuple(supported)
    dev = "cuda" if device.type == "cuda" else "cpu"
    if backend is not None:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS} or None")
        if backend not in supported:
            raise ValueError(f"{op}: backend {backend!r} does not implement this op (has: {supported})")
        st = backend_status(backend)
        if not st.available:
            raise ValueError(f"{op}: backend {backend!r} is unavailable: {st.reason}")
        if backend == "cpu" and dev != "cpu":
            raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
        if backend == "cuda" and dev != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if backend == "triton" and dev == "cpu" and not _triton_interpreter():
            raise ValueError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        return backend
    if dev not in AUTO_ORDER:
        return "reference"
    for cand in AUTO_ORDER[dev]:
        if cand not in supported:
            continue
        st = backend_status(cand)
        if st.available:
            return cand
        if not torch.compiler.is_compiling():
            _warn_once(cand, f"loupe_kernels: backend {cand!r} unavailable for {op} ({st.reason}); "
                                   f"falling back to the next backend")
    return "reference"
