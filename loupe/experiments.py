"""The CLIP / FILIP / LOUPE comparison (METHOD sections 9-10).

    python -m loupe.experiments compare --steps 400 --seeds 0 1 2 --out runs/compare

For every seed, trains each objective (``clip``, ``filip``, ``loupe``) with the same data, steps,
batch size, model size and seed through the DeepSpeed launcher (``loupe/train.py`` in a
subprocess), evaluates every run with :func:`loupe.evaluate.evaluate_checkpoint`, and writes one
table (``compare.md``) with the mean and the spread (sample standard deviation over seeds) of each
metric, plus ``compare.json`` with every per-seed value. Runs that already hold a ``model.pt`` of
the requested step are reused with ``--reuse`` (e.g. after an interrupted comparison).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Sequence

import torch

from .checkpoint import RunPaths, saved_step
from .config import OBJECTIVES
from .evaluate import evaluate_checkpoint
from .report import get_path

__all__ = ["compare", "summarise", "comparison_table", "METRICS", "train_command"]

#: (dotted path in the evaluation JSON, label) of the rows of the comparison table
METRICS: tuple[tuple[str, str], ...] = (
    ("grounding.hard.finding.discrimination", "discrimination own/any, Acc@0.5 (hard)"),
    ("grounding.relation.finding.discrimination", "discrimination own/any, Acc@0.5 (relation)"),
    ("grounding.hard.finding.own_acc50", "own Acc@0.5 (hard)"),
    ("grounding.hard.finding.any_acc50", "any-object Acc@0.5 (hard)"),
    ("grounding.relation.finding.own_acc50", "own Acc@0.5 (relation)"),
    ("grounding.relation.finding.any_acc50", "any-object Acc@0.5 (relation)"),
    ("grounding.hard_compositional.finding.discrimination", "discrimination own/any (hard, compositional)"),
    ("grounding.relation_compositional.finding.discrimination", "discrimination own/any (relation, compositional)"),
    ("grounding.test.finding.discrimination", "discrimination own/any (test)"),
    ("grounding.hard.finding.text_free", "text-free bar 1/k (hard)"),
    ("grounding.relation.finding.text_free", "text-free bar 1/k (relation)"),
    ("grounding.test.finding.text_free", "text-free bar 1/k (test)"),
    ("grounding.acc50", "grounding Acc@0.5 (test)"),
    ("grounding.acc50_compositional", "grounding Acc@0.5 (compositional)"),
    ("grounding.pointing", "pointing (test)"),
    ("grounding.pointing_compositional", "pointing (compositional)"),
    ("grounding.pointing_word_centred", "pointing, word-centred phrases (test)"),
    ("grounding.pointing_word_centred_compositional", "pointing, word-centred phrases (compositional)"),
    ("grounding.regions.acc50", "Acc@0.5, objectness regions (test)"),
    ("grounding.chance_acc50", "chance Acc@0.5 (test)"),
    ("grounding.chance_pointing", "chance pointing (test)"),
    ("grounding.oracle_acc50", "whole-patch oracle Acc@0.5 (test)"),
    ("detection.map50", "detection mAP@0.5"),
    ("detection.map", "detection mAP@[.5:.95]"),
    ("detection.box_score_only.map50", "detection mAP@0.5, ranked by box score alone"),
    ("grounding.test.map_diagnostics.box_area_ratio", "chosen / true box area, median, x100 (test)"),
    ("grounding.test.map_diagnostics.patch_pair_cos", "patch-pair cosine x100 (test)"),
    ("retrieval.i2t_r1", "retrieval i2t R@1"),
    ("retrieval.t2i_r1", "retrieval t2i R@1"),
    ("retrieval.i2t_r5", "retrieval i2t R@5"),
    ("retrieval.t2i_r5", "retrieval t2i R@5"),
    ("retrieval.filip.i2t_r1", "retrieval i2t R@1, FILIP token-wise"),
    ("retrieval.filip.t2i_r1", "retrieval t2i R@1, FILIP token-wise"),
    ("classification.top1", "classification top-1 (shape)"),
    ("classification.color_shape_top1", "classification top-1 (colour + shape)"),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(out_dir: str, objective: str, seed: int, steps: int, batch_size: int, dataset_type: str,
                  train_size: int | None = None, model_config: str | None = None, procs: int = 1,
                  extra: Sequence[str] = ()) -> list[str]:
    """The ``deepspeed`` command line that trains one run of the comparison."""
    launcher = shutil.which("deepspeed")
    base = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    train = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    cmd = base + ["--num_accelerators", str(procs), "--master_port", str(_free_port()), train,
                  "--output", out_dir, "--objective", objective, "--seed", str(seed), "--steps", str(steps),
                  "--batch-size", str(batch_size), "--dataset-type", dataset_type, "--no-eval", "--no-progress"]
    if train_size is not None:
        cmd += ["--train-size", str(train_size)]
    if model_config:
        cmd += ["--model-config", model_config]
    return cmd + list(extra)


def _get(d: dict, dotted: str):
    """The number at ``dotted`` in ``d`` (None when absent or not a number)."""
    try:
        cur = get_path(d, dotted)
    except KeyError:
        return None
    return cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


def summarise(values: Sequence[float | None]) -> dict:
    """``mean``, ``std`` (sample standard deviation, 0 for one value), ``min``, ``max`` and ``n`` of
    the values that are not None/NaN (all None when there are none)."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": m, "std": sd, "min": min(v), "max": max(v), "n": len(v)}


def comparison_table(results: dict[str, list[dict]], metrics: Sequence[tuple[str, str]] = METRICS,
                     title: str = "") -> tuple[str, dict]:
    """Markdown table (rows: metrics, columns: objectives; ``mean ± std`` in %, ``n`` seeds) and the
    summary dict ``{path: {objective: summarise(...)}}``. ``results[objective]`` = evaluation dicts."""
    objs = list(results)
    summary = {path: {o: summarise([_get(r, path) for r in results[o]]) for o in objs} for path, _ in metrics}
    lines = ([f"## {title}", ""] if title else []) + [
        "| metric (%, mean ± std over seeds) | " + " | ".join(objs) + " |", "|---|" + "---|" * len(objs)]
    for path, label in metrics:
        row = summary[path]
        if all(row[o]["n"] == 0 for o in objs):
            continue
        cells = []
        for o in objs:
            s = row[o]
            if s["n"] == 0:
                cells.append("-")
                continue
            spread = f" ± {100 * s['std']:.1f}" if s["n"] > 1 else ""  # one seed: no spread to show
            cells.append(f"{100 * s['mean']:.1f}{spread}"
                         + (f" (n={s['n']})" if s["n"] != max(len(results[x]) for x in objs) else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def compare(out: str, *, seeds: Sequence[int] = (0, 1, 2), steps: int = 400, batch_size: int = 64,
            dataset_type: str = "synthetic", train_size: int | None = None, model_config: str | None = None,
            objectives: Sequence[str] = OBJECTIVES, procs: int = 1, reuse: bool = False,
            eval_opts: dict | None = None, train_extra: Sequence[str] = (), log=print) -> dict:
    """Train and evaluate every (objective, seed); write ``compare.md`` and ``compare.json`` to ``out``."""
    for o in objectives:
        if o not in OBJECTIVES:
            raise ValueError(f"compare: unknown objective {o!r}; expected some of {OBJECTIVES}")
    if not seeds:
        raise ValueError("compare: at least one seed")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    results: dict[str, list[dict]] = {o: [] for o in objectives}
    runs = []
    for seed in seeds:
        for o in objectives:
            run_dir = os.path.abspath(os.path.join(out, dataset_type, f"{o}-seed{seed}"))
            rec = {"objective": o, "seed": seed, "dir": run_dir}
            if reuse and saved_step(run_dir) == steps:
                log(f"[compare] reuse {run_dir} (step {steps})")
                rec["train_seconds"] = None
            else:
                cmd = train_command(run_dir, o, seed, steps, batch_size, dataset_type, train_size, model_config,
                                    procs, train_extra)
                log(f"[compare] train {o} seed {seed}: {' '.join(cmd)}")
                os.makedirs(run_dir, exist_ok=True)
                t0 = time.perf_counter()
                with open(os.path.join(run_dir, "train.out"), "w") as f:
                    p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
                rec["train_seconds"] = time.perf_counter() - t0
                if p.returncode != 0 or saved_step(run_dir) != steps:
                    raise RuntimeError(f"compare: training {o} seed {seed} failed (exit {p.returncode}); "
                                       f"see {os.path.join(run_dir, 'train.out')}")
            t0 = time.perf_counter()
            res = evaluate_checkpoint(run_dir, RunPaths(run_dir).eval, **(eval_opts or {}))
            rec["eval_seconds"] = time.perf_counter() - t0
            results[o].append(res)
            runs.append(rec)
            log(f"[compare] {o} seed {seed}: Acc@0.5 {res['grounding']['acc50']:.3f}, pointing "
                f"{res['grounding']['pointing']:.3f}, mAP@0.5 {res['detection']['map50']:.3f}, "
                f"i2t R@1 {res['retrieval']['i2t_r1']:.3f}")
    title = (f"CLIP / FILIP / LOUPE on {dataset_type}: {steps} steps, batch {batch_size}, seeds "
             f"{list(seeds)}" + (f", model {model_config}" if model_config else ""))
    table, summary = comparison_table(results, title=title)
    train_s = [r["train_seconds"] for r in runs if r.get("train_seconds")]
    table += ("\n\nTraining wall time per run: "
              + (", ".join(f"{r['objective']}/s{r['seed']} {r['train_seconds']:.0f} s" for r in runs
                           if r.get("train_seconds")) if train_s else "reused runs") + ".")
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(table + "\n")
    payload = {"settings": {"seeds": list(seeds), "steps": steps, "batch_size": batch_size,
                            "dataset_type": dataset_type, "train_size": train_size, "model_config": model_config,
                            "objectives": list(objectives), "eval": eval_opts or {}},
               "runs": runs, "summary": summary,
               "per_seed": {o: [{p: _get(r, p) for p, _ in METRICS} for r in results[o]] for o in objectives}}
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(payload, f, indent=2)
    payload["table"] = table
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loupe.experiments",
                                 description="Experiments: the CLIP / FILIP / LOUPE comparison.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="train clip, filip and loupe alike, evaluate all, write one table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--steps", type=int, default=400)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--batch-size", type=int, default=64, help="global batch size")
    c.add_argument("--dataset-type", default="synthetic", choices=("synthetic", "fashion", "emoji"))
    c.add_argument("--train-size", type=int, default=None, help="training scenes (default: train.py's)")
    c.add_argument("--model-config", default=None, help="JSON of LoupeConfig overrides, passed to train.py")
    c.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    c.add_argument("--procs", type=int, default=1, help="processes per training run (--num_accelerators)")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--reuse", action="store_true", help="reuse runs whose model.pt already has --steps steps")
    c.add_argument("--num-test", type=int, default=500)
    c.add_argument("--num-compositional", type=int, default=500)
    c.add_argument("--num-single", type=int, default=500)
    c.add_argument("--no-figures", action="store_true")
    c.add_argument("--train-arg", action="append", default=[],
                   help="extra argument passed to train.py (repeatable), e.g. --train-arg=--lr=2e-3")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.procs < 1:
        ap.error("--steps, --batch-size and --procs must be >= 1")
    res = compare(a.out, seeds=a.seeds, steps=a.steps, batch_size=a.batch_size, dataset_type=a.dataset_type,
                  train_size=a.train_size, model_config=a.model_config, objectives=a.objectives, procs=a.procs,
                  reuse=a.reuse, train_extra=a.train_arg,
                  eval_opts={"num_test": a.num_test, "num_compositional": a.num_compositional,
                             "num_single": a.num_single, "figures": not a.no_figures, "progress": False})
    print(res["table"])
    print(f"\nwrote {os.path.join(a.out, 'compare.md')} and compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
