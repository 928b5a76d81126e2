"""Train LOUPE (or the CLIP / FILIP baselines) with DeepSpeed ZeRO.

    deepspeed loupe/train.py                          # 1 process on CPU (gloo), built-in synthetic set
    deepspeed --num_accelerators 2 loupe/train.py     # 2 processes
    deepspeed loupe/train.py --output runs/x --resume latest --steps 600
    deepspeed loupe/train.py --model ViT-B-16         # a model preset (python -m loupe.train --list-models)
    deepspeed loupe/train.py --dataset-type webdataset --train-data 'pipe:cat /data/shard-{000..099}.tar'

Everything lands under ``--output``: DeepSpeed checkpoints (``checkpoints/``, written by every
rank, ``latest`` replaced atomically), ``model.pt`` (consolidated fp32), ``config.json``,
``tokenizer.json`` and ``log.jsonl`` (one line per optimizer step).

Safety (issue 21): rank 0 holds ``<output>/.lock`` for the life of the run, so a second run on the
same directory stops at once, naming the first; a fresh run refuses a directory that holds a
previous run unless ``--overwrite``; ``--resume latest`` checks ``latest`` and the tag's files
before DeepSpeed reads them (see ``loupe.checkpoint.resolve_resume``); a NaN/inf loss or forward
pass stops every rank with the step and the last checkpoint; DeepSpeed's shared-memory buffers
are unlinked right after start-up, and those of dead runs removed.

Reproducibility: the batch of step ``s`` on rank ``r`` and every random draw of that step are pure
functions of ``(--seed, s, r)``, so a resumed run sees exactly the data and randomness the
uninterrupted run would have seen. This holds for the map-style readers (built-in scenes, csv,
local shards). Streamed shards (``--dataset-type webdataset`` with a URL / ``pipe:`` command, or
``--streaming``; :class:`loupe.data.StreamingShardDataset`) resume only approximately: each rank reads
its own shards, resampled with replacement (``--resampled``, the default) from a draw seeded by
``(--seed, step resumed at, rank, worker)``, so a resumed run continues with a fresh deterministic
draw rather than the samples the uninterrupted run would have read next.

Model sizes: ``--model NAME`` picks a preset of ``loupe/configs/NAME.json`` (``--list-models``
lists them: ``loupe-tiny``, the default, and open_clip's ``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``
sizes); ``--model-config`` overrides its fields. The data are drawn at the model's image size.

Collapse signals (issue 19): every ``--diag-every`` steps (and at every ``--eval-every``) the log
holds ``val_top_patch_share`` (the share of phrases whose most similar patch is the most common
such patch index), ``val_patch_pair_cos`` (the mean cosine of two patch tokens of one image) and
``val_phrase_map_corr`` (the correlation of the maps of two phrases of one image) and
``val_inside_above_outside`` (the share of phrases whose map is higher inside their own box: 0.5 when
the maps do not localise, the failure of the final seed 11), computed without
gradient on a fixed validation batch with :func:`loupe.metrics.map_diagnostics` and
:func:`loupe.metrics.patch_pair_cos`, the definitions of ``python -m loupe.evaluate``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: loupe/ itself must not shadow top-level modules
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
    try:
        import loupe  # noqa: F401  (the installed package)
    except ImportError:
        sys.path.insert(0, os.path.dirname(_here))

import argparse
import json
import math
import signal
import time
from dataclasses import dataclass
from itertools import islice

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from loupe import checkpoint as ckpt  # noqa: E402  (after the path fix above)
from loupe.config import (CONFIG_DIR, DATASET_TYPES, DEFAULT_MODEL, HARD_MIX_DEFAULT, OBJECTIVES, WARMUP_DEFAULT, WARMUP_DEFAULTS, LoupeConfig, default_warmup, describe_models,  # noqa: E402
                          list_models, model_preset)

DEFAULT_DS_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ds_config.json")
#: captions read from streamed shards to fit the tokenizer (rank 0, before training)
TOKENIZER_CAPTIONS = 100_000


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepspeed loupe/train.py",
        description="Train LOUPE / CLIP / FILIP dual encoders with DeepSpeed ZeRO "
                    "(CPU with gloo, or GPUs with NCCL).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset-type", choices=DATASET_TYPES, default="synthetic",
                   help="synthetic: built-in grounded shapes (generated on the fly); fashion / emoji: "
                        "real-image scenes from Debian packages; csv: open_clip-style CSV/TSV of image "
                        "paths and captions; webdataset: local tar shards (key.png + key.txt [+ key.json])")
    d.add_argument("--train-data", default=None,
                   help="CSV/TSV file or shard pattern/directory (required for csv and webdataset)")
    d.add_argument("--val-data", default=None, help="validation CSV/shards (csv/webdataset only)")
    d.add_argument("--csv-img-key", default="filepath", help="CSV column with image paths")
    d.add_argument("--csv-caption-key", default="title", help="CSV column with captions")
    d.add_argument("--csv-separator", default="\t", help="CSV separator")
    d.add_argument("--train-size", type=int, default=50000,
                   help="number of training scenes of the built-in sets")
    d.add_argument("--hard-mix", type=float, default=None,
                   help=f"share of the training scenes (built-in sets) drawn from the controlled streams: "
                        f"distractors sharing colour or shape, and relations (half each); default "
                        f"{HARD_MIX_DEFAULT} for the built-in sets (chosen on validation, docs/METHOD-notes.md), "
                        f"0 for csv and webdataset")
    d.add_argument("--streaming", action="store_true",
                   help="webdataset: stream the shards with the webdataset library even when they are local "
                        "(URLs and pipe: commands always stream); streamed runs resume approximately")
    d.add_argument("--resampled", action=argparse.BooleanOptionalAction, default=True,
                   help="streamed shards: each rank and worker draws shards with replacement, endlessly "
                        "(--no-resampled: epochs over this rank's shards, which need at least "
                        "world size x workers shards)")
    d.add_argument("--workers", type=int, default=0, help="data-loader worker processes per rank")
    o = p.add_argument_group("optimisation")
    o.add_argument("--objective", choices=OBJECTIVES, default="loupe",
                   help="loupe = CMC + FILIP + TSA + FSA + UA; filip = CMC + FILIP; clip = CMC")
    o.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch size over all ranks (overrides the DeepSpeed config; default 64)")
    o.add_argument("--steps", type=int, default=600,
                   help="total optimizer steps (a resumed run continues up to this step)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    o.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (not on norms, biases, scale)")
    o.add_argument("--warmup", type=int, default=None,
                   help=f"linear warm-up steps, then cosine decay to 0 (default: {WARMUP_DEFAULT}; LOUPE "
                        f"{WARMUP_DEFAULTS['loupe']}, at most a third of --steps [ours, chosen on validation and "
                        f"development seeds, docs/METHOD-notes.md]; a resumed run keeps its own)")
    o.add_argument("--seed", type=int, default=0, help="seed of data order, initialisation and sampling")
    o.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="ZeRO stage (overrides the DeepSpeed config)")
    o.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"model preset (loupe/configs/NAME.json): {', '.join(list_models())}; "
                        f"--list-models describes them")
    o.add_argument("--list-models", action="store_true", help="list the model presets and exit")
    o.add_argument("--model-config", default=None,
                   help="JSON object (or path to a JSON file) of LoupeConfig fields to override on top of "
                        "--model, e.g. '{\"vision_layers\": 2, \"embed_dim\": 64}'")
    o.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision")
    r = p.add_argument_group("output")
    r.add_argument("--output", default="runs/loupe", help="directory for checkpoints, model.pt and logs")
    r.add_argument("--resume", default=None,
                   help="'latest' (the newest complete checkpoint under --output: when checkpoints/latest "
                        "is missing, empty, dangling or stale, the newest complete tag, with a warning) "
                        "or a checkpoint tag (step<N>)")
    r.add_argument("--resume-strict", action="store_true",
                   help="with --resume latest: stop instead of falling back when checkpoints/latest is "
                        "missing, empty, names a missing tag or is older than a complete tag")
    r.add_argument("--overwrite", action="store_true",
                   help="allow replacing a previous run in --output (its checkpoints and model.pt are "
                        "removed); without it a fresh run refuses a directory that holds checkpoints")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    r.add_argument("--eval-every", type=int, default=0,
                   help="every N steps, log the losses on fixed validation batches as val_* "
                        "(0: never); the full evaluation runs at the end")
    r.add_argument("--diag-every", type=int, default=50,
                   help="every N steps (and at every --eval-every), log the register-collapse signals "
                        "val_top_patch_share, val_patch_pair_cos, val_phrase_map_corr, val_inside_above_outside on a fixed validation "
                        "batch (0: never)")
    r.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    r.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                   help="also log scalars to TensorBoard (needs the tensorboard package)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    import deepspeed  # noqa: PLC0415  (adds --deepspeed / --deepspeed_config)

    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    p = deepspeed.add_config_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list_models:
        return args
    if args.model not in list_models():
        p.error(f"--model {args.model!r} is not a preset; known: {', '.join(list_models())}")
    if args.dataset_type in ("csv", "webdataset") and not args.train_data:
        p.error(f"--dataset-type {args.dataset_type} needs --train-data")
    if args.train_data and args.dataset_type in ("csv",) and not os.path.exists(args.train_data):
        p.error(f"--train-data {args.train_data!r} does not exist")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if not math.isfinite(args.lr) or args.lr <= 0:
        p.error(f"--lr must be a finite number > 0, not {args.lr}")
    if not math.isfinite(args.wd) or args.wd < 0:
        p.error(f"--wd must be a finite number >= 0, not {args.wd}")
    if args.resume_strict and args.resume != "latest":
        p.error("--resume-strict goes with --resume latest")
    problem = output_problem(args.output)
    if problem:
        p.error(f"--output {args.output!r}: {problem}")
    args.warmup_given = args.warmup is not None
    if args.warmup is None:
        args.warmup = default_warmup(args.objective, args.steps)
    if args.warmup < 0 or args.save_every < 1 or args.eval_every < 0 or args.diag_every < 0:
        p.error("--warmup, --eval-every and --diag-every must be >= 0, --save-every >= 1")
    if args.hard_mix is None:
        args.hard_mix = 0.0 if args.dataset_type in ("csv", "webdataset") else HARD_MIX_DEFAULT
    if not (math.isfinite(args.hard_mix) and 0.0 <= args.hard_mix <= 1.0):
        p.error(f"--hard-mix must be in [0, 1], not {args.hard_mix}")
    if args.hard_mix and args.dataset_type in ("csv", "webdataset"):
        p.error(f"--hard-mix mixes controlled built-in scenes; it does not apply to --dataset-type {args.dataset_type}")
    if args.streaming and args.dataset_type != "webdataset":
        p.error("--streaming reads --dataset-type webdataset shards")
    args.streaming = is_streaming(args)
    if args.model_config:
        text = args.model_config
        if os.path.exists(text):
            with open(text) as f:
                text = f.read()
        try:
            args.model_overrides = json.loads(text)
        except json.JSONDecodeError as e:
            p.error(f"--model-config is neither a JSON object nor a JSON file: {e}")
        if not isinstance(args.model_overrides, dict):
            p.error("--model-config must be a JSON object")
    else:
        args.model_overrides = {}
    try:
        model_fields(args)
    except (TypeError, ValueError) as e:
        p.error(f"--model-config: {e}" if args.model_overrides else f"--model {args.model}: {e}")
    if args.deepspeed_config is None:
        args.deepspeed_config = DEFAULT_DS_CONFIG
    if not os.path.exists(args.deepspeed_config):
        p.error(f"--deepspeed_config {args.deepspeed_config!r} does not exist")
    return args


def is_streaming(args) -> bool:
    """Whether the training set is streamed (:class:`loupe.data.StreamingShardDataset`): webdataset
    shards with ``--streaming`` or a URL / ``pipe:`` command in ``--train-data``."""
    if args.dataset_type != "webdataset" or not args.train_data:
        return False
    from loupe.data.streaming import is_url
    return bool(args.streaming) or any(is_url(u) for u in str(args.train_data).split("::"))


def model_fields(args, vocab_size: int | None = None) -> dict:
    """The LoupeConfig fields of this run: the ``--model`` preset, then ``--model-config`` on top
    (validated; ``vocab_size`` from the tokenizer when given)."""
    fields = {**model_preset(args.model), **args.model_overrides, "objective": args.objective}
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    LoupeConfig(**fields)
    return fields


def print_models() -> None:
    """``--list-models``: name, grid, candidate boxes and description of every preset."""
    for name, desc in describe_models():
        c = LoupeConfig(**model_preset(name))
        g = c.grid_size
        k = (g * (g + 1) // 2) ** 2
        flag = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{flag}\n    {desc}\n    grid {g}x{g}, {k} candidate boxes; "
              f"file {os.path.join(CONFIG_DIR, name + '.json')}")


def output_problem(path: str) -> str | None:
    """Why ``path`` cannot be a run directory (None when it can): a file, under a file, unwritable."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a directory"
    parent = path
    while not os.path.exists(parent):
        nxt = os.path.dirname(parent)
        if nxt == parent:
            break
        parent = nxt
    if not os.path.isdir(parent):
        return f"{parent!r} is a file, so no directory can be made under it"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent!r} is not writable"
    return None


def build_ds_config(args, world_size: int) -> dict:
    with open(args.deepspeed_config) as f:
        cfg = json.load(f)
    for k in ("train_micro_batch_size_per_gpu", "optimizer", "scheduler"):
        cfg.pop(k, None) if k != "train_micro_batch_size_per_gpu" else None
    gbs = args.batch_size or cfg.get("train_batch_size", 64)
    gas = cfg.get("gradient_accumulation_steps", 1)
    if gbs % (world_size * gas):
        raise SystemExit(f"--batch-size {gbs} must be divisible by world size {world_size} x "
                         f"gradient_accumulation_steps {gas}")
    cfg["train_batch_size"] = gbs
    cfg["train_micro_batch_size_per_gpu"] = gbs // (world_size * gas)
    cfg["gradient_accumulation_steps"] = gas
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    cfg["bf16"] = {"enabled": args.precision == "bf16"}
    cfg.pop("fp16", None)
    cfg["steps_per_print"] = cfg.get("steps_per_print", 10**6)
    return cfg


# ------------------------------------------------------------------------------------------------
# data order: a pure function of (seed, step, rank)
# ------------------------------------------------------------------------------------------------
@dataclass
class StepBatchSampler:
    """Yields, for steps ``start..steps-1``, this rank's slice of the global batch.

    Global batch ``s`` = positions ``s*B .. s*B+B-1`` of an endless sequence of seeded
    permutations of the dataset (one per epoch); rank ``r`` takes the ``r``-th ``B/world`` chunk,
    so ranks never overlap and any step can be recomputed without replaying the ones before.
    """

    n: int
    global_batch: int
    rank: int
    world: int
    seed: int
    start: int
    steps: int

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def indices(self, step: int) -> list[int]:
        local = self.global_batch // self.world
        lo = step * self.global_batch + self.rank * local
        out = []
        epoch, cached = None, None
        for pos in range(lo, lo + local):
            e = pos // self.n
            if e != epoch:
                epoch, cached = e, self._perm(e)
            out.append(int(cached[pos % self.n]))
        return out

    def __iter__(self):
        for s in range(self.start, self.steps):
            yield self.indices(s)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------
# log, checkpoints
# ------------------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, wd: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name or name.endswith(".bias") or "logit_scale" in name \
                or "embedding" in name.split(".")[-1]:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def resumed_warmup(client: dict, warmup: int, given: bool) -> int:
    """The warm-up a resumed run continues with: ``--warmup`` when given, else the one its checkpoint
    recorded; checkpoints saved before the record were trained with the old default for every
    objective, WARMUP_DEFAULT."""
    if given:
        return int(warmup)
    return int(client.get("warmup", WARMUP_DEFAULT))


LOGGED_PREFIXES = ("loss", "uansil", "diag", "logit_scale", "filip_logit_scale")


def mean_over_ranks(out: dict, device: torch.device, world: int) -> dict[str, float]:
    """The scalar outputs to log (losses, UANSIL statistics, diagnostics), averaged over ranks:
    with local losses the mean over ranks is the global batch's loss."""
    keys = sorted(k for k, v in out.items() if k.startswith(LOGGED_PREFIXES)
                  and ((isinstance(v, torch.Tensor) and v.numel() == 1)
                       or (isinstance(v, (int, float)) and not isinstance(v, bool))))
    if not keys:
        return {}
    vals = torch.tensor([float(out[k].detach().float()) if isinstance(out[k], torch.Tensor) else float(out[k])
                         for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(vals)
        vals /= world
    # NaN statistics (e.g. a calibration with no calibration games yet) are logged as null
    return {k: (v if math.isfinite(v) else None) for k, v in zip(keys, vals.tolist())}


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and k == "images":
                v = v.to(float_dtype)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------
# streamed data, validation batches, collapse signals
# ------------------------------------------------------------------------------------------------
def streamed_batches(loader, dataset, start: int, steps: int, resampled: bool, device: torch.device):
    """The batches of steps ``start..steps-1`` from a DataLoader over a streamed dataset.

    Resampled streams are endless: the first ``steps - start`` batches. Finite streams run epoch
    after epoch (``dataset.set_epoch``); since ranks may hold different numbers of samples, every
    rank ends an epoch as soon as one of them runs out (one all-reduce per step), so that all ranks
    take the same number of steps."""
    n = steps - start
    if resampled:
        yield from islice(loader, n)
        return
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    epoch, done, it, fresh = dataset.epoch, 0, iter(loader), True
    while done < n:
        batch = next(it, None)
        have = torch.tensor([0.0 if batch is None else 1.0], device=device)
        if world > 1:
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if have.item() < 1:
            if fresh:
                _stop(f"a rank's share of the shards gave no batch in epoch {epoch} (--no-resampled needs at "
                      f"least world size x workers shards, each holding a batch); use more shards or --resampled",
                      dist.get_rank() if dist.is_initialized() else 0)
            epoch += 1
            dataset.set_epoch(epoch)
            it, fresh = iter(loader), True
            continue
        fresh, done = False, done + 1
        yield batch


def data_options(args, image_size: int) -> dict:
    """Options of every ``loupe.data.build_dataset`` call of the run: csv columns, image size."""
    return {"img_key": args.csv_img_key, "caption_key": args.csv_caption_key, "separator": args.csv_separator,
            "image_size": image_size}


def build_train_set(args, ldata, rank: int, world: int, data_kw: dict):
    """The training set: map-style (built-in scenes with ``--hard-mix``, csv, local shards; the
    trainer's sampler deals the ranks their samples), or for streamed shards an IterableDataset of
    this rank's shards, resampled unless ``--no-resampled``."""
    if args.streaming:
        return ldata.build_dataset("webdataset", "train", seed=args.seed, path=args.train_data, streaming=True,
                                   rank=rank, world_size=world, resampled=args.resampled, **data_kw)
    return ldata.build_dataset(args.dataset_type, "train", seed=args.seed, path=args.train_data,
                               size=args.train_size, hard_mix=args.hard_mix, **data_kw)


def validation_batches(args, ldata, collate, global_batch: int, rank: int, world: int, data_kw: dict,
                       device: torch.device) -> list[dict]:
    """This rank's fixed validation batches: its share of two global batches (none for csv /
    webdataset without ``--val-data``). Map-style sets: a seeded draw (``--seed + 1``). Streamed
    shards: every rank reads the validation stream from its start (no node split, so any number of
    shards serves any number of ranks) and keeps its own slice of the first ``2 * global_batch``
    samples; the ranks agree on the number of full batches."""
    if args.dataset_type in ("csv", "webdataset") and not args.val_data:
        return []
    local = global_batch // world
    from loupe.data.streaming import is_url
    if args.dataset_type == "webdataset" and (args.streaming or any(is_url(u) for u in str(args.val_data).split("::"))):
        val_set = ldata.build_dataset("webdataset", "val", seed=args.seed, path=args.val_data, streaming=True,
                                      rank=0, world_size=1, resampled=False, **data_kw)
        items = list(islice(val_set, 2 * rank * local, 2 * (rank + 1) * local))
        full = torch.tensor([len(items) // local], dtype=torch.long, device=device)
        if world > 1:
            import torch.distributed as dist
            dist.all_reduce(full, op=dist.ReduceOp.MIN)
        return [collate(items[i * local:(i + 1) * local]) for i in range(int(full.item()))]
    val_set = ldata.build_dataset(args.dataset_type, "val", seed=args.seed, path=args.val_data, size=None, **data_kw)
    vs = StepBatchSampler(len(val_set), global_batch, rank, world, args.seed + 1, 0, 2)
    return [collate([val_set[i] for i in idx]) for idx in vs]


COLLAPSE_KEYS = ("val_top_patch_share", "val_patch_pair_cos", "val_phrase_map_corr", "val_inside_above_outside")


def collapse_signals(out: dict, batch: dict, grid: int, patch_size: int, device: torch.device,
                     world: int) -> dict[str, float | None]:
    """The register-collapse signals of a forward pass (issue 19), over the batches of all ranks.

    ``val_top_patch_share``: the share of phrases whose most similar patch is the most common such
    patch index (1/n for spread maps; near 1 when one register patch wins every phrase);
    ``val_patch_pair_cos``: the mean cosine of two different patch tokens of one image;
    ``val_phrase_map_corr``: the mean correlation of the patch-similarity maps of two phrases of one
    image; ``val_inside_above_outside``: the share of phrases whose map is higher inside their own
    box than outside it (0.5: the maps do not localise; the failed final seed 11 read 0.52 on test,
    good seeds 0.70-0.93), only where the batch has boxes. The definitions of
    ``python -m loupe.evaluate`` (:func:`loupe.metrics.map_diagnostics`,
    :func:`loupe.metrics.patch_pair_cos`); None where the batch has no phrase (or phrase pair, or box).
    """
    from loupe.metrics import map_diagnostics, patch_pair_cos
    patches = out["patch_tokens"].detach().float()
    B, n, _ = patches.shape
    # [best-patch counts per patch index (n), sum of patch-pair cos, images, sum of map corr, pairs,
    #  phrases higher inside their box, phrases with a box that leaves patches outside]
    acc = torch.zeros(n + 6, dtype=torch.float64, device=device)
    acc[n] = patch_pair_cos(patches).sum().to(device)
    acc[n + 1] = B
    pmask = out.get("phrase_mask")
    if pmask is not None and bool(pmask.any()):
        bi, pi = pmask.nonzero(as_tuple=True)
        boxes = batch.get("boxes")
        if isinstance(boxes, torch.Tensor) and boxes.shape[:2] == pmask.shape:
            boxes = boxes.to(patches.device)[bi, pi].double()
        else:  # no boxes: the box-free signals are the same
            boxes = torch.full((len(bi), 4), float("nan"), dtype=torch.float64, device=patches.device)
        d = map_diagnostics(out["phrase_feats"].detach().float()[bi, pi], patches[bi], boxes, bi, grid, patch_size)
        acc[:n] += torch.bincount(d["best_patch"], minlength=n).to(device=device, dtype=torch.float64)
        acc[n + 2] = d["pair_corr"].nan_to_num(0.0).sum().to(device)
        acc[n + 3] = int(torch.isfinite(d["pair_corr"]).sum())
        io = d["inside_minus_outside"]
        io = io[torch.isfinite(io)]  # NaN: no box, or a box over every patch
        acc[n + 4] = int((io > 0).sum())
        acc[n + 5] = io.numel()
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(acc)
    counts, phrases = acc[:n], float(acc[:n].sum())
    ratio = lambda a, b: float(a) / float(b) if float(b) > 0 else None  # noqa: E731
    return {"val_top_patch_share": ratio(counts.max(), phrases),
            "val_patch_pair_cos": ratio(acc[n], acc[n + 1]),
            "val_phrase_map_corr": ratio(acc[n + 2], acc[n + 3]),
            "val_inside_above_outside": ratio(acc[n + 4], acc[n + 5])}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def release_shm_buffer(rank: int) -> str | None:
    """Unlink this rank's shared-memory allreduce buffer of DeepSpeed's CPU communication op.

    ``deepspeed_shm_comm`` creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (about 67 MB of RAM) for every rank and never unlinks it, so each CPU training run would leave
    one behind per process until the machine runs out of memory. Every rank maps every local rank's
    buffer inside ``init_distributed`` and never opens them by name again, so this is called right
    after the barrier that follows it (and again on the way out, in case that failed): the mappings
    stay valid until the processes exit, and no exit, not even kill -9, leaves the file behind.
    Returns the path removed, or None.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not hasattr(os, "getuid"):
        return None
    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        print(f"loupe: could not remove DeepSpeed's shared-memory buffer {path}: {e}", file=sys.stderr)
        return None
    return path


SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _paths_in_use(directory: str) -> set[str] | None:
    """Paths under ``directory`` that a live process of this machine maps or holds open (from
    ``/proc/<pid>/maps`` and ``/proc/<pid>/fd``); None when ``/proc`` cannot be read."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    used: set[str] = set()
    prefix = directory.rstrip("/") + "/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(prefix)
                    if i >= 0:
                        used.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(prefix):
                    used.add(target.removesuffix(" (deleted)"))
        except OSError:
            pass
    return used


def remove_stale_shm_buffers(min_age_s: float = 60.0, shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink DeepSpeed CPU allreduce buffers of this user that no live process maps or holds open
    and that are older than ``min_age_s`` (a run that is starting creates and maps its buffer in
    well under a second). These are left by runs killed before they could unlink their own
    (loupe runs unlink theirs right after start-up, see :func:`release_shm_buffer`). Returns the
    paths removed."""
    if not hasattr(os, "getuid") or not os.path.isdir(shm_dir):
        return []
    mine = f"{SHM_PREFIX}{os.getuid()}_"
    try:
        candidates = [os.path.join(shm_dir, n) for n in os.listdir(shm_dir) if n.startswith(mine)]
    except OSError:
        return []
    now = time.time()

    def age(path: str) -> float:  # a buffer may be unlinked meanwhile (the other ranks unlink theirs now)
        try:
            return now - os.path.getmtime(path)
        except OSError:
            return -1.0

    candidates = [c for c in candidates if age(c) >= min_age_s]
    if not candidates:
        return []
    used = _paths_in_use(shm_dir)
    if used is None:  # cannot tell which are in use: leave them
        return []
    removed = []
    for path in candidates:
        if path in used:
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


# the stop requested by SIGTERM / SIGINT, and whether main() has begun releasing the lock and buffer
_STOP: dict = {"signal": None, "releasing": False}


def _on_signal(signum, frame):  # noqa: ARG001
    """SIGTERM / SIGINT: unwind through the ``finally`` blocks (lock, log, shared memory).

    The ``deepspeed`` launcher relays the SIGTERM or SIGINT it gets to its children as SIGTERM, so
    after ``kill`` or Ctrl-C of a launch a training process gets SIGTERM twice or more while it
    unwinds. A repeated SIGTERM raises again (the first stop may have been swallowed, say inside a
    ``__del__``; the training loop also checks :data:`_STOP` every step) until main() begins its
    release, and is ignored from then on, so that no repeat cuts the release short: the default
    action of a repeat used to kill the process with its ``.lock`` still naming it. A second SIGINT
    (Ctrl-C twice) is a person's demand to stop now: it takes the default action and ends the
    process at once, as does ``kill -9`` (the lock file then names the dead run, which the next run
    takes over as stale). If the unwinding blocks in a collective, the launcher's SIGKILL after 30 s
    ends it."""
    if _STOP["signal"] is None:
        _STOP["signal"] = signum
        print(f"loupe: {signal.Signals(signum).name} received, stopping (the last checkpoint stays the newest)",
              file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a further Ctrl-C ends the process at once
    if not _STOP["releasing"]:
        raise SystemExit(128 + signum)


def _nonfinite_error(exc: BaseException) -> bool:
    """Whether an error raised by the forward pass reports non-finite values (NaN / inf)."""
    import re
    return isinstance(exc, FloatingPointError) or bool(
        re.search(r"\b(nan|inf|infinity|non-?finite)\b", str(exc), re.IGNORECASE))


def _from_rank0(value, rank: int):
    """``value`` as rank 0 has it, on every rank."""
    import torch.distributed as dist
    box = [value if rank == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _stop(message: str, rank: int):
    """End every rank of the run with ``message`` (printed once, by rank 0) and exit status 1."""
    if rank == 0:
        raise SystemExit(f"loupe: {message}")
    raise SystemExit(1)


def main(argv=None) -> int:
    """Parse the flags, start the process group, take the run directory's lock, train; the lock and
    DeepSpeed's shared-memory buffer are released on every way out (exceptions, SIGTERM, SIGINT;
    after kill -9 the kernel drops the lock and the buffer is already unlinked)."""
    args = parse_args(argv)
    if args.list_models:
        print_models()
        return 0
    import deepspeed
    import torch.distributed as dist

    import threading
    _STOP.update(signal=None, releasing=False)
    previous = {}  # the handlers to restore when main() returns (callers in-process, tests)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    rank, lock = None, None
    try:
        on_gpu = torch.cuda.is_available()
        if on_gpu:  # before any collective: NCCL object broadcasts use the current device
            torch.cuda.set_device(args.local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        rank = dist.get_rank()
        # init_distributed has mapped every local rank's shared-memory buffer on every rank once all
        # have returned from it: unlink this rank's now, so that no exit (not even kill -9) leaks it
        dist.barrier()
        release_shm_buffer(rank)
        if int(os.environ.get("LOCAL_RANK", args.local_rank)) == 0:
            stale = remove_stale_shm_buffers()
            if stale:
                print(f"loupe: removed {len(stale)} shared-memory buffer(s) of ended DeepSpeed runs: "
                      f"{', '.join(stale)}", file=sys.stderr)
        # the run directory's lock, before anything in the directory is read or written; bound before
        # it is taken, so that a signal during acquire() still finds it to release
        refusal = None
        if rank == 0:
            lock = ckpt.RunLock(args.output)
            try:
                lock.acquire(argv=sys.argv)
                if lock.note:
                    print(f"loupe: {lock.note}", file=sys.stderr)
            except (ckpt.RunLocked, OSError) as e:
                refusal = str(e)
        refusal = _from_rank0(refusal, rank)
        if refusal:
            _stop(refusal, rank)
        return _train(args)
    finally:
        _STOP["releasing"] = True  # from here on a repeated SIGTERM is ignored (_on_signal)
        try:
            if lock is not None:
                lock.release()
            if rank is not None:
                release_shm_buffer(rank)
        finally:
            for sig, handler in previous.items():
                if handler is not None:  # None: a handler installed outside Python, which cannot be restored
                    signal.signal(sig, handler)


def _train(args) -> int:
    import deepspeed
    import torch.distributed as dist

    from loupe import data as ldata
    from loupe.model import LoupeModel

    on_gpu = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", args.local_rank) if on_gpu else torch.device("cpu")
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        # share the cores among the ranks of this machine: oversubscribed OpenMP threads spin
        # against each other and slow every rank down many times over
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    is_main = rank == 0

    run = ckpt.RunPaths(args.output)
    out_dir, ckpt_dir, log_path = run.root, run.checkpoints, run.log
    # which checkpoint to resume (decided by rank 0, before DeepSpeed reads anything)
    decision = None
    if is_main:
        try:
            if args.resume is None:
                found = ckpt.previous_run(out_dir)
                if found and not args.overwrite:
                    raise ckpt.CheckpointError(
                        f"--output {out_dir} already holds a run ({', '.join(found)}); pass --resume latest "
                        f"to continue it, or --overwrite to replace it")
                for path in (ckpt.clear_run(out_dir) if found else []):
                    print(f"loupe: --overwrite: removed {path}", file=sys.stderr)
                decision = {"tag": None}
            else:
                tag, warnings, remove = ckpt.resolve_resume(ckpt_dir, args.resume, strict=args.resume_strict,
                                                            overwrite=args.overwrite)
                for w in warnings:
                    print(f"loupe: warning: {w}", file=sys.stderr)
                for path in ckpt.clear_run(out_dir, remove):
                    print(f"loupe: removed {path}", file=sys.stderr)
                decision = {"tag": tag}
        except ckpt.CheckpointError as e:
            decision = {"error": str(e)}
    decision = _from_rank0(decision, rank)
    if "error" in decision:
        _stop(decision["error"], rank)
    resume_tag = decision["tag"]
    if is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()

    # the model's image size (a resumed run keeps its saved config): the data are drawn at it
    saved = ckpt.read_config(out_dir) if resume_tag else None
    if saved is not None:
        image_size = LoupeConfig.from_dict(saved["model"]).image_size
        saved_model = (saved.get("train") or {}).get("model", DEFAULT_MODEL)
        if is_main and (saved_model != args.model or args.model_overrides):
            print(f"loupe: warning: --resume keeps the saved model config (trained as --model {saved_model}); "
                  f"--model / --model-config are ignored", file=sys.stderr)
    else:
        image_size = LoupeConfig(**model_fields(args)).image_size

    # data and tokenizer (fit once on rank 0, saved with the model, loaded by the other ranks)
    tok_path = run.tokenizer
    data_kw = data_options(args, image_size)
    train_set = build_train_set(args, ldata, rank, world, data_kw)
    if is_main and not (resume_tag and os.path.exists(tok_path)):
        if args.streaming:
            tokenizer = ldata.train_tokenizer(train_set.captions(limit=TOKENIZER_CAPTIONS), train_set.tokenizer_kind)
        else:
            tokenizer = ldata.fit_tokenizer(train_set)
        tokenizer.save(tok_path)
    dist.barrier()
    tokenizer = ldata.load_tokenizer(tok_path)

    # records the data set left out when it was read (bad rows, images, sidecars: warned about there)
    scan_skipped = int(getattr(train_set, "skipped", 0) or 0)
    if is_main and scan_skipped:
        print(f"loupe: the training data has {scan_skipped} bad record(s), skipped (see the warnings above; "
              f"also in config.json as data_skipped_at_scan)", file=sys.stderr)
    if saved is not None:
        config = LoupeConfig.from_dict(saved["model"])
        if config.objective != args.objective:
            raise SystemExit(f"--resume: the checkpoint was trained with --objective {config.objective}, "
                             f"not {args.objective}")
    else:
        config = LoupeConfig(**model_fields(args, tokenizer.vocab_size))
    torch.manual_seed(args.seed)  # same initialisation on every rank
    model = LoupeModel(config)

    ds_config = build_ds_config(args, world)
    local_batch = ds_config["train_micro_batch_size_per_gpu"]
    if is_main:
        ckpt.write_config(out_dir, config, {k: v for k, v in vars(args).items()
                                            if isinstance(v, (int, float, str, bool, type(None)))},
                          deepspeed=ds_config, world_size=world, data_skipped_at_scan=int(scan_skipped))

    optimizer = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    start = 0
    if resume_tag:
        try:
            path, client = engine.load_checkpoint(ckpt_dir, tag=resume_tag)
        except Exception as e:  # noqa: BLE001 - name the file, and the tags one could resume instead
            bad = ckpt.find_unreadable(ckpt_dir, resume_tag)
            older = [t for t in ckpt.list_tags(ckpt_dir) if t != resume_tag]
            raise SystemExit(f"loupe: --resume: cannot load checkpoint {resume_tag} from {ckpt_dir}"
                             f"{f' ({bad} is unreadable)' if bad else ''}: {e.__class__.__name__}: {e}; "
                             f"other tags: {', '.join(older) or 'none'}") from e
        if path is None:
            raise SystemExit(f"loupe: --resume: could not load checkpoint {resume_tag!r} from {ckpt_dir}")
        start = int(client["step"])
        saved_warmup = resumed_warmup(client, args.warmup, args.warmup_given)
        if saved_warmup != args.warmup:
            if is_main:
                print(f"loupe: the resumed run keeps its learning-rate warm-up of {saved_warmup} steps "
                      f"(pass --warmup to change it)")
            args.warmup = saved_warmup
            scheduler.lr_lambdas = [lr_lambda(args.warmup, args.steps)] * len(scheduler.lr_lambdas)
        if is_main:
            dropped = ckpt.truncate_log(log_path, start)
            print(f"loupe: resumed from {resume_tag} at step {start}"
                  + (f" (dropped {dropped} log lines past it)" if dropped else ""))
    elif is_main and os.path.exists(log_path):
        os.replace(log_path, log_path + ".old")
    dist.barrier()

    collate = ldata.Collator(tokenizer)
    if args.streaming:
        # no random access: each rank iterates its own stream; the draw of a resumed run is seeded by
        # the step it resumes at (approximate resume, see the module docstring)
        train_set.set_epoch(start)
        loader = torch.utils.data.DataLoader(train_set, batch_size=local_batch, collate_fn=collate,
                                             num_workers=args.workers, drop_last=True)
        batches = streamed_batches(loader, train_set, start, args.steps, args.resampled, device)
    else:
        sampler = StepBatchSampler(len(train_set), ds_config["train_batch_size"], rank, world, args.seed,
                                   start, args.steps)
        batches = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                              num_workers=args.workers, persistent_workers=False)
    float_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    # fixed validation batches: losses every --eval-every steps, collapse signals every --diag-every
    val_batches = []
    if args.eval_every or args.diag_every:
        val_batches = validation_batches(args, ldata, collate, ds_config["train_batch_size"], rank, world,
                                         data_kw, device)
        if not val_batches and is_main:
            print("loupe: no validation data (csv/webdataset need --val-data): no val_* losses or collapse "
                  "signals in the log", file=sys.stderr)

    def val_forward(vb: dict) -> tuple[dict, dict]:
        vb = to_device(dict(vb), device, float_dtype)
        vb.pop("skipped", None)
        vb["step"], vb["seed"] = step, step_seed(args.seed + 1, step, rank)
        return engine(vb), vb

    def validate(losses: bool) -> dict[str, float]:
        """val_* losses over the validation batches (``losses``) and the collapse signals of the first."""
        engine.eval()
        res: dict[str, float] = {}
        with torch.no_grad():
            for i, vb in enumerate(val_batches if losses else val_batches[:1]):
                out, vb = val_forward(vb)
                if i == 0:
                    res.update(collapse_signals(out, vb, config.grid_size, config.patch_size, device, world))
                if losses:
                    for k, v in mean_over_ranks(out, device, world).items():
                        if k.startswith("loss") and v is not None:
                            res["val_" + k] = res.get("val_" + k, 0.0) + v / len(val_batches)
        engine.train()
        return res

    writer = None
    if is_main and args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
    bar = None
    if is_main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc=f"train {args.objective}", unit="step",
                   dynamic_ncols=True)

    def params_finite() -> bool:
        ok = torch.tensor([1.0 if all(bool(torch.isfinite(p.detach()).all()) for p in engine.module.parameters()
                                      if p.numel()) else 0.0], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok.item() >= 1

    def last_good() -> str:
        tag = ckpt.latest_tag(ckpt_dir)
        if last_saved > 0 and tag:
            return f"the last good checkpoint is {tag} (step {last_saved}) in {ckpt_dir}: resume it with a lower --lr"
        return "no checkpoint was saved before it"

    def save(step: int) -> None:
        if not params_finite():  # never save (or point latest at) weights that are already lost
            _stop(f"training diverged: non-finite weights after step {step}; {last_good()}", rank)
        tag = f"step{step:07d}"
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step, "warmup": args.warmup},
                               save_latest=False)
        dist.barrier()  # every rank's files are written
        if is_main:
            ckpt.finish_tag(ckpt_dir, tag, step)  # sync, manifest, then latest
        dist.barrier()

    step, last_saved, skipped_total = start, start, 0
    stream_skipped = 0  # train_set.skipped already counted (streaming: bad samples dropped in the reader)
    if is_main and start and os.path.exists(log_path):  # the count goes on from the resumed step
        with open(log_path) as f:
            lines = [line for line in f if line.strip()]
        if lines:
            skipped_total = int(json.loads(lines[-1]).get("skipped", 0) or 0)
    t_prev = time.perf_counter()
    log_f = open(log_path, "a") if is_main else None
    try:
        for batch in batches:
            if _STOP["signal"] is not None:  # a stop whose SystemExit was swallowed on its way up
                raise SystemExit(128 + _STOP["signal"])
            t_data = time.perf_counter() - t_prev
            torch.manual_seed(step_seed(args.seed, step, rank))
            skipped_step = int(batch.pop("skipped", 0))
            if args.streaming:  # what the reader (and its workers) dropped since the last step
                now_skipped = int(train_set.skipped)
                skipped_step += now_skipped - stream_skipped
                stream_skipped = now_skipped
            batch = to_device(batch, device, float_dtype)
            batch["step"] = step
            batch["seed"] = step_seed(args.seed, step, rank)
            try:
                out, failure = engine(batch), None
            except Exception as e:  # noqa: BLE001 - NaN/inf caught by a kernel's input check
                if not _nonfinite_error(e):
                    raise
                out, failure = None, e
            # [ranks with a non-finite loss or non-finite values in the forward pass, samples skipped
            # by the collator on all ranks]: every rank agrees on both
            bad_skip = torch.tensor([1.0 if failure is not None
                                     else 1.0 - float(torch.isfinite(out["loss"].detach().float()).item()),
                                     float(skipped_step)], dtype=torch.float64, device=device)
            dist.all_reduce(bad_skip)
            skipped_total += int(bad_skip[1].item())
            if bad_skip[0].item() > 0:
                if failure is not None:
                    what = f"non-finite values in the forward pass ({failure})"
                elif out is not None and torch.isfinite(out["loss"].detach().float()).item():
                    what = "a non-finite loss on another rank"
                else:
                    bad = [k for k, v in out.items() if k.startswith("loss") and isinstance(v, torch.Tensor)
                           and v.numel() == 1 and not torch.isfinite(v.detach().float()).item()]
                    what = f"a non-finite loss (terms: {', '.join(bad) or 'loss'})"
                _stop(f"training diverged at step {step + 1}: {what}; {last_good()}", rank)
            loss = out["loss"]
            engine.backward(loss)
            engine.step()
            step += 1
            now = time.perf_counter()
            rec = {"step": step, "lr": scheduler.get_last_lr()[0] if scheduler is not None else args.lr,
                   "samples_per_s": ds_config["train_batch_size"] / max(now - t_prev, 1e-9),
                   "data_time": t_data, "skipped": skipped_total}
            rec.update(mean_over_ranks(out, device, world))
            do_val = bool(val_batches) and bool(args.eval_every) and step % args.eval_every == 0
            do_diag = bool(val_batches) and bool(args.diag_every) and step % args.diag_every == 0
            if do_val or do_diag:
                del out, loss  # the step's activations, before the validation forward passes
                rec.update(validate(losses=do_val))
                now = time.perf_counter()  # validation time is not data time
            t_prev = now
            if is_main:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                if writer is not None:
                    for k, v in rec.items():
                        if k != "step":
                            writer.add_scalar(k, v, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
            if step % args.save_every == 0 or step == args.steps:
                save(step)
                last_saved = step
    finally:
        if log_f is not None:
            log_f.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    if last_saved != step:
        save(step)
    # consolidated fp32 weights, readable without DeepSpeed (loupe.load)
    if is_main:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=ckpt.latest_tag(ckpt_dir))
        ckpt.save_model(out_dir, config, state, step)
    eval_json = run.eval
    eval_done = False
    if is_main and not args.no_eval:
        try:
            from loupe.evaluate import evaluate_checkpoint
            evaluate_checkpoint(out_dir, out_json=eval_json, progress=not args.no_progress)
            eval_done = True
        except Exception as e:  # noqa: BLE001 - the trained model is saved; say why evaluation failed
            print(f"loupe: evaluation failed ({e.__class__.__name__}: {e}); run "
                  f"`python -m loupe.evaluate --checkpoint {out_dir} --out {eval_json}` to retry")
    dist.barrier()
    if is_main:
        print(f"loupe: trained {args.objective} to step {step} on {world} process(es)")
        print(f"  model:       {run.model} (load with loupe.load({out_dir!r}))")
        print(f"  checkpoints: {ckpt_dir}")
        print(f"  log:         {log_path}")
        if eval_done:
            print(f"  evaluation:  {eval_json} (+ .md table and figures beside it)")
        if skipped_total:
            print(f"  skipped {skipped_total} samples that failed to decode (all ranks; cumulative "
                  f"'skipped' in the log)")
        if scan_skipped:
            print(f"  skipped {scan_skipped} bad records when reading the data (config.json: data_skipped_at_scan)")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
