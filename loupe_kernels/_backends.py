"""Backend discovery and dispatch shared by every op.

Backends: ``cuda`` (compiled CUDA extension), ``triton`` (Triton kernels), ``cpu`` (compiled C++
extension) and ``reference`` (plain PyTorch). Automatic choice: CPU tensors -> cpu > reference;
CUDA tensors -> the order of ``AUTO_TABLE`` for (op, dtype, shape class) where the op passes them,
else cuda > triton > reference. The Triton interpreter (``TRITON_INTERPRET=1``) is used only when
``backend="triton"`` is asked for explicitly on CPU tensors.

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
class AutoChoice:
    """Preferred backend order on CUDA tensors for one (op, dtype, shape class), and where it comes from:
    ``measured`` names the run it was read from (a ``benchmarks/gpu.sh`` result: device, date, file);
    ``None`` means provisional, reasoned from the kernels' code, never timed."""
    order: tuple[str, ...]
    why: str
    measured: str | None = None

    @property
    def source(self) -> str:
        return f"measured ({self.measured})" if self.measured else "provisional (not measured)"


# Automatic choice on CUDA tensors per (op, dtype, shape class); "*" matches any dtype. The op computes
# its shape class (token_region_similarity: ``_shape_class``). To fill an entry from measurements, time
# both backends with ``benchmarks/gpu.sh`` (same device, same run), put the faster first and set
# ``measured="<device>, <date>, benchmarks/RESULTS.md"``. Nothing below has been timed yet: no GPU.
_TRS = "token_region_similarity"
AUTO_TABLE: dict[tuple[str, str, str], AutoChoice] = {
    # shape class "fast": pairwise, D % 8 == 0 (16-bit) or D % 4 == 0 (fp32), any D (D streamed in chunks)
    (_TRS, "bfloat16", "fast"): AutoChoice(
        ("cuda", "triton", "reference"),
        "cuda fast kernel: query tile resident (or D streamed in chunks), key rows streamed with cp.async, "
        "WMMA 128x64 tiles"),
    (_TRS, "float16", "fast"): AutoChoice(
        ("cuda", "triton", "reference"), "as bfloat16"),
    (_TRS, "float32", "fast"): AutoChoice(
        ("cuda", "triton", "reference"),
        "cuda fast kernel on tensor cores: 3xTF32 WMMA (one-pass TF32 when torch allows TF32), "
        "the same 3-pass precision as Triton's tf32x3 dot"),
    # "generic": odd D, or an unaligned width; "pairs": pairwise=False (aligned pairs only)
    (_TRS, "float32", "generic"): AutoChoice(
        ("triton", "cuda", "reference"),
        "cuda takes its FMA kernel here (no tensor cores); Triton runs tf32x3 dots"),
    (_TRS, "float32", "pairs"): AutoChoice(
        ("triton", "cuda", "reference"), "as float32 generic: the cuda fast kernel is pairwise-only"),
    (_TRS, "bfloat16", "generic"): AutoChoice(
        ("triton", "cuda", "reference"),
        "cuda takes its generic WMMA kernel (Q and K reloaded element by element per 64 features)"),
    (_TRS, "float16", "generic"): AutoChoice(("triton", "cuda", "reference"), "as bfloat16 generic"),
    (_TRS, "bfloat16", "pairs"): AutoChoice(("triton", "cuda", "reference"), "as bfloat16 generic"),
    (_TRS, "float16", "pairs"): AutoChoice(("triton", "cuda", "reference"), "as bfloat16 generic"),
    (_TRS, "float64", "*"): AutoChoice(
        ("cuda", "triton", "reference"), "fp64 is no target; cuda's FMA kernel, as before"),
}


def auto_choice(op: str, dtype: torch.dtype | None = None, shape_class: str | None = None) -> AutoChoice | None:
    """The ``AUTO_TABLE`` entry for (op, dtype, shape class) on CUDA tensors, or None (default order)."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    for key in ((op, name, shape_class), (op, name, "*"), (op, "*", shape_class), (op, "*", "*")):
        if key in AUTO_TABLE:
            return AUTO_TABLE[key]
    return None


def auto_table_lines() -> list[str]:
    """``AUTO_TABLE`` as text (printed by ``python -m loupe_kernels.env``)."""
    lines = []
    for (op, dt, shape), ch in AUTO_TABLE.items():
        lines.append(f"  {op} {dt:<8} {shape:<7} {' > '.join(ch.order):<28} {ch.source}: {ch.why}")
    lines.append(f"  any other op or dtype            {' > '.join(AUTO_ORDER['cuda']):<28} default order")
    return lines


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
                    supported: Iterable[str], *, dtype: torch.dtype | None = None,
                    shape_class: str | None = None) -> str:
    """Pick the backend for one call of ``op`` on tensors on ``device``.

    ``supported`` are the backends that implement this op. An explicit ``backend`` must be known,
    implemented and available (ValueError otherwise); ``None`` picks automatically: on CUDA tensors
    in the order of ``AUTO_TABLE`` for (op, dtype, shape_class) when there is an entry.
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
    order = AUTO_ORDER[dev]
    if dev == "cuda":
        choice = auto_choice(op, dtype, shape_class)
        if choice is not None:
            order = choice.order
    for cand in order:
        if cand not in supported:
            continue
        st = backend_status(cand)
        if st.available:
            return cand
        if not torch.compiler.is_compiling():
            _warn_once(cand, f"loupe_kernels: backend {cand!r} unavailable for {op} ({st.reason}); "
                                   f"falling back to the next backend")
    return "reference"
