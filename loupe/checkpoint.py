"""The run directory: the only code that knows its layout (written by ``loupe.train``, read by
``loupe.load``, evaluation and grounding).

A training output directory holds::

    config.json       {"model": LoupeConfig.to_dict(), "train": {...}, "deepspeed": {...}, "world_size": n}
    tokenizer.json    the tokenizer fitted on the training captions
    model.pt          {"config", "state_dict", "step"}: consolidated fp32 weights (written at the end)
    checkpoints/      DeepSpeed checkpoints ("step<N>" tags) and ``latest`` (the newest complete tag)
    log.jsonl         one JSON record per logged step
    eval.json (+ .md, _figures/)   the evaluation written after training
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .config import LoupeConfig

if TYPE_CHECKING:
    from .model import LoupeModel

__all__ = ["CheckpointError", "RunPaths", "load", "load_checkpoint", "save_model", "write_config", "read_config",
           "write_atomic", "truncate_log", "resolve_resume_tag", "latest_tag", "saved_step"]

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
EVAL_FILE = "eval.json"


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or does not fit this version of loupe."""


class RunPaths:
    """The paths of a run directory (absolute)."""

    def __init__(self, directory: str) -> None:
        d = os.path.abspath(os.fspath(directory))
        self.root = d
        self.model = os.path.join(d, MODEL_FILE)
        self.config = os.path.join(d, CONFIG_FILE)
        self.tokenizer = os.path.join(d, TOKENIZER_FILE)
        self.log = os.path.join(d, LOG_FILE)
        self.checkpoints = os.path.join(d, CHECKPOINTS)
        self.eval = os.path.join(d, EVAL_FILE)


def _dir_of(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(directory: str, config: LoupeConfig, train: Mapping[str, Any], **extra: Any) -> None:
    """``config.json``: the model config, the training settings and ``extra`` entries."""
    write_atomic(RunPaths(directory).config, json.dumps({"model": config.to_dict(), "train": dict(train), **extra},
                                                        indent=2))


def read_config(directory: str) -> dict | None:
    """``config.json`` as a dict, or None when there is none; :class:`CheckpointError` when unreadable."""
    path = RunPaths(_dir_of(directory)).config
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path!r} is not valid JSON: {e}") from e
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path!r} does not hold a JSON object")
    return saved


def save_model(directory: str, config: LoupeConfig, state_dict: Mapping[str, torch.Tensor], step: int) -> str:
    """Write the consolidated ``model.pt`` atomically; returns its path."""
    path = RunPaths(directory).model
    torch.save({"config": config.to_dict(), "state_dict": dict(state_dict), "step": int(step)}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def truncate_log(path: str, last_step: int) -> int:
    """Keep the lines of ``log.jsonl`` with ``step <= last_step``; returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if rec.get("step", 0) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return dropped


def latest_tag(ckpt_dir: str) -> str | None:
    """The tag named by ``checkpoints/latest`` (None when absent)."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def resolve_resume_tag(ckpt_dir: str, resume: str | None) -> str | None:
    """The DeepSpeed tag ``--resume`` names: None (fresh start), ``latest``, or a tag that must exist."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_tag(ckpt_dir)
    if not os.path.isdir(os.path.join(ckpt_dir, resume)):
        raise SystemExit(f"--resume {resume!r}: no checkpoint {os.path.join(ckpt_dir, resume)}")
    return resume


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def load(path: str, map_location: str | torch.device = "cpu") -> "LoupeModel":
    """Load a trained model for inference, in eval mode.

    ``path`` is a training output directory holding ``model.pt`` (``{"config": config.to_dict(),
    "state_dict": ...}``) and usually ``config.json`` (``{"model": config.to_dict(), ...}``), or a
    ``model.pt`` file itself. The config comes from ``model.pt``, or from ``config.json`` when
    ``model.pt`` has none. Parameters of training-only loss terms (``loss_modules.*``) are dropped.
    Raises ``FileNotFoundError`` for a missing checkpoint and ``ValueError`` for one that does not
    fit the model it describes. When ``tokenizer.json`` lies beside it and ``loupe.data`` can read
    it, the tokenizer is attached as ``model.tokenizer`` (else ``model.tokenizer`` is None).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        directory, ckpt_path = path, os.path.join(path, MODEL_FILE)
    else:
        directory, ckpt_path = os.path.dirname(path) or ".", path
    if not os.path.exists(ckpt_path):
        hint = ""
        if os.path.isdir(os.path.join(directory, CHECKPOINTS)):
            hint = (" (the directory has DeepSpeed checkpoints but no consolidated model.pt: the run did "
                    "not finish; resume it, or consolidate with deepspeed.utils.zero_to_fp32)")
        raise FileNotFoundError(f"loupe.load: no checkpoint {ckpt_path!r}{hint}")
    try:
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        raise ValueError(f"loupe.load: cannot read {ckpt_path!r}: {e}") from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"loupe.load: {ckpt_path!r} is not a loupe checkpoint (expected a dict with "
                         f"'config' and 'state_dict')")
    cfg_dict = ckpt.get("config")
    json_path = os.path.join(directory, CONFIG_FILE)
    if cfg_dict is None:
        if not os.path.exists(json_path):
            raise FileNotFoundError(f"loupe.load: {ckpt_path!r} holds no config and {json_path!r} is missing")
        with open(json_path) as f:
            saved = json.load(f)
        cfg_dict = saved.get("model", saved) if isinstance(saved, dict) else saved
    try:
        config = LoupeConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"loupe.load: incompatible config in {ckpt_path!r}: {e}") from e
    from .model import LoupeModel
    model = LoupeModel(config)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt["state_dict"].items()}
    state = {k: v for k, v in state.items() if not k.startswith("loss_modules.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("loss_modules.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                parts.append(f"{label}: {keys[:5]}{' ...' if len(keys) > 5 else ''}")
        raise ValueError(f"loupe.load: {ckpt_path!r} does not fit its config ({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)
    model.tokenizer = None
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.exists(tok_path):
        try:
            from . import data as _data
            model.tokenizer = _data.load_tokenizer(tok_path)
        except (ImportError, AttributeError):
            model.tokenizer = None
    return model.to(map_location).eval()


def load_checkpoint(directory: str, device: str | torch.device = "cpu"):
    """``(model, train_config)`` of a training output directory; :class:`CheckpointError` when the
    checkpoint is missing, unreadable, incompatible, or was saved without its tokenizer."""
    if not os.path.exists(directory):
        raise CheckpointError(f"checkpoint {directory!r} does not exist")
    try:
        model = load(directory, map_location=device)
    except (FileNotFoundError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot evaluate checkpoint {directory!r}: {e}") from e
    if getattr(model, "tokenizer", None) is None:
        raise CheckpointError(f"checkpoint {directory!r} has no readable tokenizer.json beside model.pt; "
                              f"evaluation needs the tokenizer the model was trained with")
    saved = read_config(directory) or {}
    try:
        train_cfg = saved.get("train", {}) or {}
    except AttributeError as e:
        raise CheckpointError(f"config.json of {directory!r} is malformed: {e}") from e
    return model, train_cfg


def saved_step(directory: str) -> int | None:
    """The training step stored in ``model.pt`` (None when unreadable)."""
    try:
        return int(torch.load(RunPaths(_dir_of(directory)).model, map_location="cpu", weights_only=True).get("step", -1))
    except Exception:  # noqa: BLE001  (the step is informative only)
        return None
