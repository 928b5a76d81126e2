"""The run directory: the only code that knows its layout (written by ``loupe.train``, read by
``loupe.load``, evaluation and grounding).

A training output directory holds::

    config.json       {"model": LoupeConfig.to_dict(), "train": {...}, "deepspeed": {...}, "world_size": n}
    tokenizer.json    the tokenizer fitted on the training captions
    model.pt          {"config", "state_dict", "step"}: consolidated fp32 weights (written at the end)
    checkpoints/      DeepSpeed checkpoints ("step<N>" tags) and ``latest`` (the newest complete tag)
      step<N>/loupe_manifest.json   written last, after every rank's files are on disk: the name and
                                    size of each file of the tag (a tag without it is incomplete)
    log.jsonl         one JSON record per logged step
    eval.json (+ .md, _figures/)   the evaluation written after training
    .lock             held (``flock``) by rank 0 of the run writing the directory; holds its pid, host
                      and start time while it runs, empty once it has ended cleanly
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import re
import socket
import zipfile
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .config import LoupeConfig

if TYPE_CHECKING:
    from .model import LoupeModel

__all__ = ["CheckpointError", "RunLocked", "RunLock", "RunPaths", "list_tags", "check_tag", "finish_tag",
           "resolve_resume", "previous_run", "clear_run", "find_unreadable", "load", "load_checkpoint", "save_model", "write_config", "read_config",
           "write_atomic", "truncate_log", "resolve_resume_tag", "latest_tag", "saved_step"]

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"
LATEST = "latest"
MANIFEST = "loupe_manifest.json"
_TAG_RE = re.compile(r"^step(\d+)$")


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
        self.lock = os.path.join(d, LOCK_FILE)
        self.latest = os.path.join(self.checkpoints, LATEST)


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
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every file system can sync a directory
        pass
    finally:
        os.close(fd)


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
    """The tag named by ``checkpoints/latest`` (None when absent; ``""`` when empty)."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _tag_step(tag: str) -> int:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else -1


def list_tags(ckpt_dir: str) -> list[str]:
    """The checkpoint tag directories (``step<N>``) under ``ckpt_dir``, oldest first."""
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return []
    return sorted((n for n in names if _TAG_RE.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))),
                  key=_tag_step)


def finish_tag(ckpt_dir: str, tag: str, step: int) -> None:
    """Mark a tag complete and make it ``latest``: called once (rank 0) after every rank's
    ``save_checkpoint`` has returned (a barrier). Syncs the tag's files to disk, writes
    ``loupe_manifest.json`` (each file's size) and then ``latest``, both atomically."""
    tag_dir = os.path.join(ckpt_dir, tag)
    files = {}
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if name == MANIFEST or ".tmp" in name or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = os.path.getsize(path)
    _fsync_dir(tag_dir)
    write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps({"tag": tag, "step": int(step), "files": files},
                                                             indent=1))
    write_atomic(os.path.join(ckpt_dir, LATEST), tag)


def _torch_file_ok(path: str) -> bool:
    """A file written by ``torch.save`` is a zip archive: a truncated one lacks the archive's end record."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def check_tag(ckpt_dir: str, tag: str) -> tuple[str, str | None] | None:
    """None when the tag is complete, else ``(reason, path of the bad file or None)``.

    Cheap (no tensor is read): the manifest lists every file and its size; each file must be there,
    of that size, and each ``.pt`` a whole zip archive (what ``torch.save`` writes). A tag without a
    manifest is incomplete, unless no tag of the directory has one (written before manifests
    existed): then it passes when it has model states and every ``.pt`` file is whole.
    """
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        return f"{tag_dir} does not exist", None
    manifest = os.path.join(tag_dir, MANIFEST)
    names = sorted(n for n in os.listdir(tag_dir) if n.endswith(".pt"))
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                files = json.load(f)["files"]
            sizes = {str(k): int(v) for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"its manifest {manifest} is unreadable ({e})", manifest
        for name, size in sizes.items():
            path = os.path.join(tag_dir, name)
            if not os.path.exists(path):
                return f"{path} is missing", path
            have = os.path.getsize(path)
            if have != size:
                return f"{path} is truncated or changed ({have} bytes, {size} when saved)", path
        names = [n for n in names if n in sizes]
    elif any(os.path.exists(os.path.join(ckpt_dir, t, MANIFEST)) for t in list_tags(ckpt_dir)):
        return f"{tag_dir} is incomplete (no {MANIFEST}: the run stopped while saving it)", None
    elif not any(n.endswith("model_states.pt") for n in names):
        return f"{tag_dir} is incomplete (no model states: the run stopped while saving it)", None
    for name in names:
        path = os.path.join(tag_dir, name)
        if os.path.getsize(path) == 0 or not _torch_file_ok(path):
            return f"{path} is truncated or corrupt (not a whole torch file)", path
    return None


def _tags_text(tags: list[str]) -> str:
    return ", ".join(tags) if tags else "none"


def resolve_resume(ckpt_dir: str, resume: str | None, strict: bool = False,
                   overwrite: bool = False) -> tuple[str | None, list[str], list[str]]:
    """Which checkpoint ``--resume`` means, checked before DeepSpeed reads anything.

    Returns ``(tag or None for a fresh start, warnings, tags to remove first)``; raises
    :class:`CheckpointError` with a message naming the bad file and the tags available.

    ``latest``: the tag named by ``checkpoints/latest`` when it is complete and no complete tag is
    newer. When ``latest`` is missing, empty, names a tag that does not exist, or is older than a
    complete tag (a run killed between writing a tag and ``latest``), the newest complete tag is
    used, with a warning (``strict``: an error instead). A corrupt tag named by ``latest`` is an
    error, never skipped silently. An explicit tag must be complete; resuming from it when newer
    tags exist would overwrite them, so that needs ``overwrite`` (they are then removed).
    """
    if resume is None:
        return None, [], []
    tags = list_tags(ckpt_dir)
    warnings: list[str] = []
    if resume not in ("latest",):
        bad = check_tag(ckpt_dir, resume) if os.path.isdir(os.path.join(ckpt_dir, resume)) else \
            (f"no checkpoint {os.path.join(ckpt_dir, resume)}", None)
        if bad is not None:
            raise CheckpointError(f"--resume {resume}: {bad[0]}; tags under {ckpt_dir}: {_tags_text(tags)}")
        newer = [t for t in tags if _tag_step(t) > _tag_step(resume)]
        if newer and not overwrite:
            raise CheckpointError(f"--resume {resume}: the newer checkpoints {_tags_text(newer)} would be "
                                  f"overwritten; pass --overwrite to remove them, or --resume latest")
        return resume, warnings, newer
    named = latest_tag(ckpt_dir)
    if named is None and not tags:
        return None, [f"--resume latest: no checkpoint under {ckpt_dir}, starting from step 0"], []
    complete = None
    for t in reversed(tags):  # the newest complete tag (cheap checks, newest first)
        if check_tag(ckpt_dir, t) is None:
            complete = t
            break
    incomplete_newer = [t for t in tags if complete is None or _tag_step(t) > _tag_step(complete)]
    latest_path = os.path.join(ckpt_dir, LATEST)
    if named and os.path.isdir(os.path.join(ckpt_dir, named)):
        bad = check_tag(ckpt_dir, named)
        if bad is not None:
            older = [t for t in tags if _tag_step(t) < _tag_step(named)]
            raise CheckpointError(
                f"--resume latest: checkpoint {named} is corrupt: {bad[0]}; older tags: {_tags_text(older)} "
                f"(resume one with --resume <tag>; the newer tags are then removed with --overwrite)")
        if complete is None or _tag_step(complete) <= _tag_step(named):
            if incomplete_newer:
                warnings.append(f"--resume latest: the incomplete checkpoints {_tags_text(incomplete_newer)} "
                                f"(a run stopped while saving) will be replaced")
            return named, warnings, incomplete_newer
        problem = (f"{latest_path} names {named}, but {complete} is newer and complete (the run was stopped "
                   f"between saving {complete} and updating latest)")
    elif named is None:
        problem = f"{latest_path} is missing"
    elif not named:
        problem = f"{latest_path} is empty"
    else:
        problem = f"{latest_path} names {named!r}, which does not exist"
    if strict:
        raise CheckpointError(f"--resume latest (strict): {problem}; tags under {ckpt_dir}: {_tags_text(tags)} "
                              f"(resume one with --resume <tag>)")
    if complete is None:
        raise CheckpointError(f"--resume latest: {problem}, and no checkpoint under {ckpt_dir} is complete "
                              f"(tags: {_tags_text(tags)}); pass --overwrite without --resume to start again")
    warnings.append(f"--resume latest: {problem}; resuming from {complete}, the newest complete checkpoint")
    if incomplete_newer:
        warnings.append(f"--resume latest: the incomplete checkpoints {_tags_text(incomplete_newer)} will be replaced")
    return complete, warnings, incomplete_newer


def resolve_resume_tag(ckpt_dir: str, resume: str | None) -> str | None:
    """The tag :func:`resolve_resume` picks (warnings dropped); ``SystemExit`` on an error."""
    try:
        return resolve_resume(ckpt_dir, resume)[0]
    except CheckpointError as e:
        raise SystemExit(str(e)) from e


def previous_run(directory: str) -> list[str]:
    """What a fresh run would overwrite in ``directory``: checkpoint tags, ``latest``, ``model.pt``."""
    run = RunPaths(directory)
    found = list_tags(run.checkpoints)
    if os.path.exists(run.latest):
        found.append(LATEST)
    if os.path.exists(run.model):
        found.append(MODEL_FILE)
    return found


def clear_run(directory: str, tags: list[str] | None = None) -> list[str]:
    """Remove ``tags`` (default: every checkpoint tag, ``latest`` and ``model.pt``) of a run
    directory; returns the paths removed."""
    import shutil
    run = RunPaths(directory)
    removed = []
    if tags is None:
        targets = [os.path.join(run.checkpoints, t) for t in list_tags(run.checkpoints)] + [run.latest, run.model]
    else:
        targets = [os.path.join(run.checkpoints, t) for t in tags]
    for path in targets:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
        else:
            continue
        removed.append(path)
    return removed


def find_unreadable(ckpt_dir: str, tag: str) -> str | None:
    """The first file of a tag that ``torch.load`` cannot read (None when all load); slow, for
    naming the culprit after a load failed."""
    tag_dir = os.path.join(ckpt_dir, tag)
    for name in sorted(os.listdir(tag_dir)):
        if not name.endswith(".pt"):
            continue
        path = os.path.join(tag_dir, name)
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001
            return path
    return None


# ------------------------------------------------------------------------------------------------
# the run lock
# ------------------------------------------------------------------------------------------------
class RunLocked(RuntimeError):
    """Another run holds the output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class RunLock:
    """An exclusive lock on a run directory for the life of a training run.

    ``<dir>/.lock`` is locked with ``flock`` (released by the kernel however the process ends, also
    on kill -9) and holds ``{"pid", "host", "started", "argv"}`` of the holder while it runs. One
    process per run takes it (rank 0): the other ranks follow rank 0's verdict. On file systems
    without ``flock`` (some NFS mounts) the file's content is the lock: a holder on this host whose
    pid is gone is stale and taken over; a holder on another host must be removed by hand.
    A clean release empties the file (it is not deleted: deleting a locked file lets two runs lock
    two different files).
    """

    def __init__(self, directory: str) -> None:
        self.path = RunPaths(directory).lock
        self.fd: int | None = None
        self.note: str | None = None  # set by acquire() when a stale holder was taken over

    @staticmethod
    def describe(holder: Mapping[str, Any] | None) -> str:
        if not holder:
            return "an unknown process"
        return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
                f"started {holder.get('started', '?')}")

    def _read(self, fd: int) -> dict | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        except OSError:
            return None
        if not text:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {"pid": "?", "host": "?", "started": "?", "raw": text[:200]}
        return holder if isinstance(holder, dict) else {"raw": text[:200]}

    def acquire(self, argv: list[str] | None = None) -> "RunLock":
        """Take the lock or raise :class:`RunLocked` naming the holder. Creates the directory (and
        nothing else in it) when needed."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        host = socket.gethostname()
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            have_flock = True
        except (BlockingIOError, PermissionError) as e:  # held by a live run
            holder = self._read(fd)
            os.close(fd)
            raise RunLocked(f"{os.path.dirname(self.path)} is in use by another training run "
                            f"({self.describe(holder)}); wait for it to end or choose another --output") from e
        except (ImportError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL,
                                                          errno.ENOSYS):
                os.close(fd)
                raise
            have_flock = False
        previous = self._read(fd)
        if previous:
            alive = previous.get("host") == host and isinstance(previous.get("pid"), int) \
                and previous["pid"] != os.getpid() and _pid_alive(previous["pid"])
            if not have_flock and (alive or previous.get("host") != host):
                os.close(fd)
                why = "still runs" if alive else "runs on another host, which this one cannot check"
                raise RunLocked(f"{os.path.dirname(self.path)} is in use by another training run "
                                f"({self.describe(previous)}; it {why}; this file system has no flock: "
                                f"if that run has ended, delete {self.path})")
            self.note = (f"took over the stale lock {self.path} of {self.describe(previous)}: that run "
                         f"ended without releasing it (killed or crashed)")
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        holder = {"pid": os.getpid(), "host": host, "started": started}
        if argv is not None:
            holder["argv"] = list(argv)
        data = json.dumps(holder).encode()
        self.fd = fd  # before the record is written: release() empties whatever part of it a signal leaves
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return self

    @classmethod
    def holder(cls, directory: str) -> dict | None:
        """The training run that holds ``directory`` now (its ``{"pid", "host", "started", ...}``), or
        None when no run holds it. Takes nothing: readers (the evaluation) use it to say that the
        model they read may be replaced by the next save."""
        path = RunPaths(directory).lock
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            reader = cls(directory)
            try:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                # read after the failed lock, not before: a run that takes the lock writes its own
                # record after flock, so a read made earlier could name the previous (ended) holder
                return reader._read(fd) or {}
            except (ImportError, OSError):  # no flock here: the content is the lock
                info = reader._read(fd)
                if info and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                        and _pid_alive(info["pid"]):
                    return info
                return None
            return None
        finally:
            os.close(fd)  # drops the shared flock if it was taken

    def release(self) -> None:
        """Empty the lock file and unlock it (idempotent)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


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
