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

__all__ = ["compare", "ablate", "run_arms", "table_from_runs", "collapse_report", "collapse_signals_of_run", "bars_table", "ABLATIONS", "merge_config", "summarise", "comparison_table", "METRICS",
           "HEADLINE", "per_seed_table", "train_command"]

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
    ("grounding.test.map_diagnostics.top_patch_share", "top-patch share x100 (test; register collapse when high)"),
    ("grounding.test.map_diagnostics.inside_above_outside", "maps higher inside the own box, share x100 (test; 50: no localisation)"),
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


def train_env() -> dict[str, str]:
    """The environment of the training subprocesses: this process's, with the folder that holds
    *this* ``loupe`` first on ``PYTHONPATH``. ``train.py`` run as a script imports the installed
    ``loupe``; without this a comparison run from another checkout (a clone of a tag, say) evaluated
    with its own code but trained with whatever ``loupe`` was installed."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def train_command(out_dir: str, objective: str, seed: int, steps: int, batch_size: int, dataset_type: str,
                  train_size: int | None = None, model_config: str | None = None, procs: int = 1,
                  extra: Sequence[str] = ()) -> list[str]:
    """The ``deepspeed`` command line that trains one run of the comparison."""
    launcher = shutil.which("deepspeed")
    base = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    train = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    cmd = base + ["--num_accelerators", str(procs), "--master_port", str(_free_port()), train,
                  "--output", out_dir, "--objective", objective, "--seed", str(seed), "--steps", str(steps),
                  "--batch-size", str(batch_size), "--dataset-type", dataset_type, "--no-eval", "--no-progress",
                  "--overwrite"]  # a run of the grid is retrained only when it is not reused
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


#: the ablation of LOUPE at its defaults (issue 18): name -> LoupeConfig overrides [ours]
ABLATIONS: dict[str, dict] = {
    "loupe": {},
    "similarity_labels": {"loupe_options": {"fsa_labels": "similarity"}},   # (a) SSIM labels from <p, r>
    "uniform_labels": {"loupe_options": {"fsa_labels": "uniform"}},         # (b) only the cross-image term left
    "no_tsa": {"loss_weights": {"tsa": 0.0}},                               # (c) a = 0
    "no_filip": {"loss_weights": {"filip": 0.0}},                           # (d) f = 0
    # (e) FILIP + phrase contrast + cross-image negatives, no Shapley term at all
    "no_shapley": {"loss_weights": {"tsa": 0.0, "ua": 0.0}, "loupe_options": {"fsa_labels": "similarity"}},
}


#: the rows of the per-seed table (docs/PROTOCOL.md: per-seed values, then mean ± std)
HEADLINE: tuple[tuple[str, str], ...] = (
    ("grounding.hard.finding.discrimination", "discrimination (hard)"),
    ("grounding.relation.finding.discrimination", "discrimination (relation)"),
    ("grounding.test.finding.discrimination", "discrimination (test)"),
    ("grounding.hard.finding.own_acc50", "own Acc@0.5 (hard)"),
    ("grounding.relation.finding.own_acc50", "own Acc@0.5 (relation)"),
    ("grounding.acc50", "Acc@0.5 (test)"),
    ("grounding.pointing", "pointing (test)"),
    ("retrieval.i2t_r1", "i2t R@1"),
    ("grounding.test.map_diagnostics.top_patch_share", "top-patch share (test)"),
    ("grounding.test.map_diagnostics.inside_above_outside", "maps higher inside the own box (test; 50: none)"),
)


def per_seed_table(results: dict[str, list[dict]], seeds: Sequence[int],
                   metrics: Sequence[tuple[str, str]] = HEADLINE) -> str:
    """Markdown table of every (metric, arm) row with one column per seed (%), then mean ± std."""
    seeds = list(seeds)
    lines = ["| metric (%) | arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for path, label in metrics:
        if all(_get(r, path) is None for rs in results.values() for r in rs):
            continue
        for arm, rs in results.items():
            vals = [_get(r, path) for r in rs]
            cells = ["-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"
                     for v in vals]
            s = summarise(vals)
            tail = "-" if s["n"] == 0 else (f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s["n"] > 1
                                             else f"{100 * s['mean']:.1f}")
            lines.append(f"| {label} | {arm} | " + " | ".join(cells) + f" | {tail} |")
    return "\n".join(lines)


def bars_table(results: dict[str, list[dict]], seeds: Sequence[int]) -> str:
    """Markdown tables of what ignores the phrase, per seed: the text-free (1/k) and attribute bars
    of the evaluation scenes (read from the first arm that has them: every arm of a seed sees the
    same scenes), and each model's computed text-free boxes (its best box for the caption's mean
    token; for models with a region head also the top objectness box), own / any Acc@0.5, mean
    over seeds. Empty when no run has the finding-vs-naming figures."""
    splits = ("test", "compositional", "hard", "relation")
    bars = (("text_free", "text-free (1/k)"), ("attribute_color", "colour-only"), ("attribute_shape", "shape-only"))
    ref = next((rs for rs in results.values() if rs and _get(rs[0], "grounding.test.finding.text_free") is not None),
               None)
    if ref is None:
        return ""
    lines = ["### The bars that ignore the phrase, per evaluation seed (the same scenes for every model)", "",
             "| split | bar | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for split in splits:
        for key, label in bars:
            vals = [_get(r, f"grounding.{split}.finding.{key}") for r in ref]
            if all(v is None for v in vals):
                continue
            lines.append(f"| {split} | {label} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals)
                         + " |")
    cols = [(arm, "text_free_caption", arm) for arm in results]
    cols += [(arm, "text_free_objectness", f"{arm}, top objectness box") for arm in results
             if any(_get(r, "grounding.test.finding.text_free_objectness.any_acc50") is not None for r in results[arm])]
    lines += ["", "### Computed text-free rows: each model's best box for the caption's mean token (one box for "
              "every phrase of a caption), own / any Acc@0.5, mean over seeds", "",
              "| split | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for split in ("test", "hard", "relation"):
        cells = []
        for arm, key, _ in cols:
            own = summarise([_get(r, f"grounding.{split}.finding.{key}.own_acc50") for r in results[arm]])
            anyv = summarise([_get(r, f"grounding.{split}.finding.{key}.any_acc50") for r in results[arm]])
            cells.append("-" if own["n"] == 0 else f"{100 * own['mean']:.1f} / {100 * anyv['mean']:.1f}")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_from_runs(out: str, seeds: Sequence[int], arms: Sequence[str] | None = None,
                    dataset_type: str = "synthetic", title: str = "", name: str = "table",
                    eval_seed_offset: int | None = None) -> dict:
    """The tables of finished runs, from their ``eval.json`` alone (nothing is trained or evaluated):
    the mean ± std table, every seed's values and the bars. Runs are ``out/<dataset>/<arm>-seed<s>``
    (the layout of :func:`run_arms`); ``arms`` default to every arm that has a run for every seed.
    With ``eval_seed_offset`` each run must have been evaluated on the test scenes of seed offset +
    its training seed. Writes ``out/<name>.md`` and ``out/<name>.json``; raises ``FileNotFoundError``
    naming a missing evaluation and ``ValueError`` naming a run evaluated on other scenes."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("table: at least one seed")
    root = os.path.join(out, dataset_type)
    if arms is None:
        found = sorted({d.rsplit("-seed", 1)[0] for d in (os.listdir(root) if os.path.isdir(root) else [])
                        if "-seed" in d})
        arms = [a for a in found if all(os.path.exists(os.path.join(root, f"{a}-seed{s}", "eval.json")) for s in seeds)]
        order: dict[str, int] = {}
        for a in list(OBJECTIVES) + ["clip_matched"] + list(ABLATIONS):
            order.setdefault(a, len(order))
        arms = sorted(arms, key=lambda a: (order.get(a, len(order)), a))
        if not arms:
            raise FileNotFoundError(f"table: no arm under {root} has an eval.json for every seed {seeds}")
    results: dict[str, list[dict]] = {a: [] for a in arms}
    dirs: dict[str, list[str]] = {a: [] for a in arms}
    for s in seeds:
        for a in arms:
            path = os.path.join(root, f"{a}-seed{s}", "eval.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"table: {path} is missing (train and evaluate that run first)")
            with open(path) as f:
                r = json.load(f)
            data = r.get("data") or {}
            if eval_seed_offset is not None and (data.get("eval_seed") != eval_seed_offset + s or data.get("validation")):
                raise ValueError(f"table: {path} was evaluated on scenes of seed {data.get('eval_seed')!r}"
                                 f"{' (validation)' if data.get('validation') else ''}, not on the test scenes of "
                                 f"seed {eval_seed_offset + s}")
            results[a].append(r)
            dirs[a].append(os.path.dirname(os.path.abspath(path)))
    table, summary = comparison_table(results, title=title)
    text = "\n\n".join(x for x in (table, "### Per seed\n\n" + per_seed_table(results, seeds), bars_table(results, seeds))
                        if x)
    payload = {"seeds": seeds, "arms": list(arms), "dataset_type": dataset_type, "eval_seed_offset": eval_seed_offset,
               "runs": dirs, "summary": summary,
               "per_seed": {a: {str(s): {p: _get(r, p) for p, _ in METRICS} for s, r in zip(seeds, results[a])}
                            for a in arms}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    payload["table"] = text
    return payload


#: issue 19 item 4, declared before the fresh seeds 20-29 were run (thirteenth session) [ours]: a
#: collapse signal of the training log is flat when its mean over the last sixth of the run (steps
#: 500-600 of 600) exceeds its mean over the window after the FILIP ramp (steps 200-300: a third to
#: a half of the run) by at most this much
FLAT_RISE = 0.10
#: and a run localises on the test scenes when its maps are higher inside the phrase's own box than
#: outside for at least this share of phrases (0.5: no localisation), its pointing is above chance
#: and its discrimination (own / any) above the text-free bar 1/k
LOCALISES_INSIDE = 0.60


def _log_records(path: str) -> list[dict]:
    """The records of a training ``log.jsonl`` in step order, the last record of each step (a resumed
    run logs the steps after its checkpoint again; a torn last line is skipped)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def collapse_signals_of_run(run_dir: str) -> dict:
    """The register-collapse signals of one run: ``series`` (each log key of
    :data:`loupe.train.COLLAPSE_KEYS` -> ``[(step, value), ...]``), per key its mean over the
    window after the ramp (``early``: steps in (T/3, T/2]) and over the end (``late``: steps >
    5T/6), ``rise`` = late - early and ``flat`` (rise <= :data:`FLAT_RISE`), T being the last step
    logged (``last_step``; ``steps`` is the run's ``--steps`` from config.json, to tell an unfinished
    run; each step's last record counts, non-finite values are left out); and from ``eval.json`` (when present) the test scenes' diagnostics and whether the run
    ``localises`` (:data:`LOCALISES_INSIDE`, pointing above chance, discrimination above the
    text-free bar). Raises ``FileNotFoundError`` naming a missing log and ``ValueError`` naming a
    log without the signals (a run trained with ``--diag-every 0`` or before they were logged)."""
    from .train import COLLAPSE_KEYS
    run = RunPaths(run_dir)
    if not os.path.exists(run.log):
        raise FileNotFoundError(f"collapse: {run.log} is missing (train that run first)")
    recs = _log_records(run.log)
    series = {k: [(r["step"], float(r[k])) for r in recs
                  if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and math.isfinite(r[k])]
              for k in COLLAPSE_KEYS}
    if not any(series.values()):
        raise ValueError(f"collapse: {run.log} has no collapse signals ({', '.join(COLLAPSE_KEYS)}): train with "
                         f"--diag-every N > 0")
    last = max(r["step"] for r in recs)
    steps = None  # the run's --steps, from config.json: a run that stopped early is marked, not scaled silently
    if os.path.exists(run.config):
        try:
            with open(run.config) as f:
                steps = (json.load(f).get("train") or {}).get("steps")
        except (OSError, ValueError, AttributeError):
            steps = None
    out: dict = {"run": os.path.abspath(run_dir), "last_step": last,
                 "steps": steps if isinstance(steps, int) else None, "series": series, "signals": {}}
    for k, pts in series.items():
        early = [v for st, v in pts if last / 3 < st <= last / 2]
        late = [v for st, v in pts if st > 5 * last / 6]
        e = sum(early) / len(early) if early else None
        lt = sum(late) / len(late) if late else None
        rise = lt - e if e is not None and lt is not None else None
        out["signals"][k] = {"early": e, "late": lt, "rise": rise, "flat": None if rise is None else rise <= FLAT_RISE}
    if os.path.exists(run.eval):
        with open(run.eval) as f:
            ev = json.load(f)
        ev_vals = {"top_patch_share": _get(ev, "grounding.test.map_diagnostics.top_patch_share"),
                   "patch_pair_cos": _get(ev, "grounding.test.map_diagnostics.patch_pair_cos"),
                   "phrase_map_corr": _get(ev, "grounding.test.map_diagnostics.phrase_map_corr"),
                   "inside_above_outside": _get(ev, "grounding.test.map_diagnostics.inside_above_outside"),
                   "pointing": _get(ev, "grounding.pointing"), "chance_pointing": _get(ev, "grounding.chance_pointing"),
                   "acc50": _get(ev, "grounding.acc50"),
                   "discrimination": _get(ev, "grounding.test.finding.discrimination"),
                   "text_free": _get(ev, "grounding.test.finding.text_free")}
        checks = [(ev_vals["inside_above_outside"], LOCALISES_INSIDE, True),
                  (ev_vals["pointing"], ev_vals["chance_pointing"], False),
                  (ev_vals["discrimination"], ev_vals["text_free"], False)]
        ev_vals["localises"] = (None if any(v is None or bar is None for v, bar, _ in checks)
                                else all((v >= bar) if at_least else (v > bar) for v, bar, at_least in checks))
        out["eval"] = ev_vals
    return out


def collapse_report(out: str, seeds: Sequence[int], arm: str = "loupe", dataset_type: str = "synthetic",
                    name: str = "collapse", title: str = "", figure: bool = True) -> dict:
    """Issue 19 item 4: the collapse signals of the runs ``out/<dataset>/<arm>-seed<s>`` (the layout
    of :func:`run_arms`), per seed (:func:`collapse_signals_of_run`): a Markdown table, the JSON and
    (``figure``) a PNG of the signals against the step, one line per seed. Writes ``out/<name>.md``,
    ``.json`` and ``.png``."""
    from .report import figure_collapse_signals
    from .train import COLLAPSE_KEYS
    seeds = list(seeds)
    if not seeds:
        raise ValueError("collapse: at least one seed")
    runs = {s: collapse_signals_of_run(os.path.join(out, dataset_type, f"{arm}-seed{s}")) for s in seeds}
    short = {"val_top_patch_share": "top-patch share", "val_patch_pair_cos": "patch-pair cosine",
             "val_phrase_map_corr": "phrase-map correlation", "val_inside_above_outside": "inside > outside"}

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def flag(v):
        return "-" if v is None else ("yes" if v else "**no**")

    lines = ([f"## {title}", ""] if title else []) + [
        f"Training log (validation batch), x100: the mean over steps (T/3, T/2] -> the mean over the last "
        f"sixth (steps > 5T/6), T the last step logged; flat: top-patch share and patch-pair cosine rise "
        f"by at most {100 * FLAT_RISE:.0f}.", "",
        "| seed | T | " + " | ".join(short[k] for k in COLLAPSE_KEYS[:2]) + " | flat (top-patch, cosine) | "
        + " | ".join(short[k] for k in COLLAPSE_KEYS[2:]) + " |", "|---|" + "---|" * 6]
    for s, r in runs.items():
        sig = r["signals"]
        cells = [f"{pct(sig[k]['early'])} -> {pct(sig[k]['late'])}" for k in COLLAPSE_KEYS]
        flat = [sig[k]["flat"] for k in COLLAPSE_KEYS[:2]]
        both = None if None in flat else all(flat)
        t = str(r["last_step"]) + ("" if r["steps"] in (None, r["last_step"]) else f" (of {r['steps']}: unfinished)")
        lines.append(f"| {s} | {t} | {cells[0]} | {cells[1]} | {flag(both)} | {cells[2]} | {cells[3]} |")
    if any("eval" in r for r in runs.values()):
        lines += ["", f"Evaluation, test scenes, x100; localises: maps higher inside the own box for >= "
                      f"{100 * LOCALISES_INSIDE:.0f}% of phrases, pointing above chance, discrimination above "
                      f"the text-free bar.", "",
                  "| seed | top-patch share | patch-pair cosine | inside > outside | pointing / chance | "
                  "discrimination / text-free | Acc@0.5 | localises |", "|---|" + "---|" * 7]
        for s, r in runs.items():
            e = r.get("eval")
            if e is None:
                lines.append(f"| {s} | not evaluated |" + " |" * 6)
                continue
            lines.append(f"| {s} | {pct(e['top_patch_share'])} | {pct(e['patch_pair_cos'])} | "
                         f"{pct(e['inside_above_outside'])} | {pct(e['pointing'])} / {pct(e['chance_pointing'])} | "
                         f"{pct(e['discrimination'])} / {pct(e['text_free'])} | {pct(e['acc50'])} | "
                         f"{flag(e['localises'])} |")
    text = "\n".join(lines)
    payload = {"seeds": seeds, "arm": arm, "dataset_type": dataset_type, "flat_rise": FLAT_RISE,
               "localises_inside": LOCALISES_INSIDE, "runs": {str(s): r for s, r in runs.items()}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    if figure:
        payload["figure"] = figure_collapse_signals(
            {s: r["series"] for s, r in runs.items()}, os.path.join(out, f"{name}.png"),
            title=title or f"{arm}, {dataset_type}: register-collapse signals per seed")
    payload["table"] = text
    return payload


def merge_config(base: dict | None, extra: dict | None) -> dict:
    """``base`` updated by ``extra``, one level deep for the dict-valued fields (``loupe_options``,
    ``loss_weights``)."""
    out = dict(base or {})
    for k, v in (extra or {}).items():
        out[k] = {**(out.get(k) or {}), **v} if isinstance(v, dict) else v
    return out


def compare(out: str, *, seeds: Sequence[int] = (0, 1, 2), steps: int = 400, batch_size: int = 64,
            dataset_type: str = "synthetic", train_size: int | None = None, model_config: str | None = None,
            objectives: Sequence[str] = OBJECTIVES, procs: int = 1, reuse: bool = False,
            eval_opts: dict | None = None, train_extra: Sequence[str] = (), eval_seed_offset: int | None = None,
            post_hoc_centring: Sequence[str] = (), objective_configs: dict[str, dict] | None = None,
            compute_matched_clip: float | None = None, objective_train_args: dict[str, list[str]] | None = None,
            log=print) -> dict:
    """Train and evaluate every (objective, seed); write ``compare.md`` and ``compare.json`` to ``out``.
    The objectives in ``post_hoc_centring`` are evaluated with word tokens centred on their caption
    (``EvalOptions.center_words=True``) whatever they were trained with (FILIP's best variant);
    ``objective_configs[o]``: LoupeConfig overrides of objective ``o`` only, on top of ``model_config``.
    ``compute_matched_clip = r`` adds the arm ``clip_matched``: CLIP (with its own settings) trained for
    ``round(r * steps)`` steps, where ``r`` is LOUPE's measured step cost over CLIP's (the step
    benchmark), so that it spends LOUPE's compute. ``objective_train_args[o]``: ``train.py`` flags of
    objective ``o`` only (its tuned learning rate), after ``train_extra``; ``clip_matched`` takes
    CLIP's."""
    for o in list(objectives) + list(post_hoc_centring):
        if o not in OBJECTIVES:
            raise ValueError(f"compare: unknown objective {o!r}; expected some of {OBJECTIVES}")
    for o in post_hoc_centring:
        if o not in objectives:
            raise ValueError(f"compare: post_hoc_centring names {o!r}, which is not compared")
    for o, cfg in (objective_configs or {}).items():
        if o not in objectives:
            raise ValueError(f"compare: objective_configs names {o!r}, which is not compared")
        if not isinstance(cfg, dict):
            raise ValueError(f"compare: the config of {o!r} must be a JSON object, got {cfg!r}")
    for o, extra in (objective_train_args or {}).items():
        if o not in objectives and not (o == "clip" and compute_matched_clip is not None):
            raise ValueError(f"compare: objective_train_args names {o!r}, which is not compared")
        if isinstance(extra, str) or not all(isinstance(x, str) for x in extra):
            raise ValueError(f"compare: the train.py flags of {o!r} must be a list of strings, got {extra!r}")
    arm_steps: dict[str, int] = {}
    if compute_matched_clip is not None:
        r = compute_matched_clip
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r >= 1.0):
            raise ValueError(f"compare: compute_matched_clip is LOUPE's step cost over CLIP's, a finite "
                             f"number >= 1, got {r!r}")
    base = json.loads(model_config) if model_config else None
    arms = {o: (o, merge_config(base, (objective_configs or {}).get(o)) or None) for o in objectives}
    if compute_matched_clip is not None:
        arms["clip_matched"] = ("clip", merge_config(base, (objective_configs or {}).get("clip")) or None)
        arm_steps["clip_matched"] = int(round(compute_matched_clip * steps))
    title = (f"{' / '.join(objectives)} on {dataset_type}: {steps} steps, batch {batch_size}, seeds "
             f"{list(seeds)}" + (f", model {model_config}" if model_config else ""))
    for o, cfg in (objective_configs or {}).items():
        title += f"; {o}: {json.dumps(cfg)}"
    if post_hoc_centring:
        title += f"; evaluated with post-hoc word centring: {', '.join(post_hoc_centring)}"
    for o, extra in (objective_train_args or {}).items():
        title += f"; {o} trained with {' '.join(extra)}"
    if compute_matched_clip is not None:
        title += (f"; clip_matched: CLIP for {arm_steps['clip_matched']} steps ({compute_matched_clip:g}x, "
                  f"LOUPE's step cost over CLIP's)")
    return run_arms(out, arms, "compare", title, seeds=seeds, steps=steps, batch_size=batch_size,
                    dataset_type=dataset_type, train_size=train_size, procs=procs, reuse=reuse,
                    eval_opts=eval_opts, train_extra=train_extra, eval_seed_offset=eval_seed_offset,
                    arm_eval={o: {"center_words": True} for o in post_hoc_centring}, arm_steps=arm_steps,
                    arm_train_extra={label: list((objective_train_args or {}).get(o, ()))
                                     for label, (o, _) in arms.items()}, log=log)


def ablate(out: str, *, seeds: Sequence[int] = (0, 1, 2), steps: int = 600, batch_size: int = 64,
           dataset_type: str = "synthetic", train_size: int | None = None, model_config: str | None = None,
           variants: Sequence[str] = tuple(ABLATIONS), procs: int = 1, reuse: bool = False,
           eval_opts: dict | None = None, train_extra: Sequence[str] = (), eval_seed_offset: int | None = None,
           log=print) -> dict:
    """LOUPE at its defaults against the same run with one part taken out (:data:`ABLATIONS`), same
    seeds and budget; writes ``ablate.md`` and ``ablate.json``."""
    for v in variants:
        if v not in ABLATIONS:
            raise ValueError(f"ablate: unknown variant {v!r}; expected some of {list(ABLATIONS)}")
    base = json.loads(model_config) if model_config else None
    arms = {v: ("loupe", merge_config(base, ABLATIONS[v])) for v in variants}
    title = (f"LOUPE ablation on {dataset_type}: {steps} steps, batch {batch_size}, seeds {list(seeds)}"
             + (f", model {model_config}" if model_config else ""))
    return run_arms(out, arms, "ablate", title, seeds=seeds, steps=steps, batch_size=batch_size,
                    dataset_type=dataset_type, train_size=train_size, procs=procs, reuse=reuse,
                    eval_opts=eval_opts, train_extra=train_extra, eval_seed_offset=eval_seed_offset, log=log)


def run_arms(out: str, arms: dict[str, tuple[str, dict | None]], name: str, title: str, *,
             seeds: Sequence[int], steps: int, batch_size: int, dataset_type: str, train_size: int | None,
             procs: int, reuse: bool, eval_opts: dict | None, train_extra: Sequence[str],
             eval_seed_offset: int | None = None, arm_eval: dict[str, dict] | None = None,
             arm_steps: dict[str, int] | None = None, arm_train_extra: dict[str, list[str]] | None = None,
             log=print) -> dict:
    """Train and evaluate every (arm, seed): ``arms[label] = (objective, LoupeConfig overrides)``.
    Writes ``<name>.md`` and ``<name>.json`` to ``out``; runs live in ``out/<dataset>/<label>-seed<s>``.
    ``eval_seed_offset``: each run is evaluated on the scenes of seed ``offset + training seed``
    (docs/PROTOCOL.md: 100), which excludes a fixed ``eval_opts["eval_seed"]``. ``arm_eval[label]``:
    evaluation options of that arm only (on top of ``eval_opts``); ``arm_steps[label]``: that arm's
    training steps instead of ``steps``; ``arm_train_extra[label]``: that arm's ``train.py`` flags
    after ``train_extra``."""
    if not seeds:
        raise ValueError(f"{name}: at least one seed")
    if eval_seed_offset is not None:
        if (eval_opts or {}).get("eval_seed") is not None:
            raise ValueError(f"{name}: give either an evaluation seed or an evaluation seed offset, not both")
        if isinstance(eval_seed_offset, bool) or not isinstance(eval_seed_offset, int) or eval_seed_offset < 0:
            raise ValueError(f"{name}: eval_seed_offset must be an int >= 0, got {eval_seed_offset!r}")
    os.makedirs(out, exist_ok=True)
    env = train_env()
    results: dict[str, list[dict]] = {label: [] for label in arms}
    runs = []
    for seed in seeds:
        for label, (objective, cfg) in arms.items():
            run_dir = os.path.abspath(os.path.join(out, dataset_type, f"{label}-seed{seed}"))
            n_steps = (arm_steps or {}).get(label, steps)
            rec = {"objective": label, "seed": seed, "dir": run_dir, "steps": n_steps}
            if reuse and saved_step(run_dir) == n_steps:
                log(f"[{name}] reuse {run_dir} (step {n_steps})")
                rec["train_seconds"] = None
            else:
                cmd = train_command(run_dir, objective, seed, n_steps, batch_size, dataset_type, train_size,
                                    json.dumps(cfg) if cfg else None, procs,
                                    list(train_extra) + list((arm_train_extra or {}).get(label, ())))
                log(f"[{name}] train {label} seed {seed}: {' '.join(cmd)}")
                os.makedirs(run_dir, exist_ok=True)
                t0 = time.perf_counter()
                with open(os.path.join(run_dir, "train.out"), "w") as f:
                    p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
                rec["train_seconds"] = time.perf_counter() - t0
                if p.returncode != 0 or saved_step(run_dir) != n_steps:
                    raise RuntimeError(f"{name}: training {label} seed {seed} failed (exit {p.returncode}); "
                                       f"see {os.path.join(run_dir, 'train.out')}")
            opts = {**(eval_opts or {}), **((arm_eval or {}).get(label) or {})}
            if eval_seed_offset is not None:
                opts["eval_seed"] = eval_seed_offset + seed
            rec["eval_seed"] = opts["eval_seed"] if opts.get("eval_seed") is not None else seed
            t0 = time.perf_counter()
            res = evaluate_checkpoint(run_dir, RunPaths(run_dir).eval, **opts)
            rec["eval_seconds"] = time.perf_counter() - t0
            results[label].append(res)
            runs.append(rec)
            log(f"[{name}] {label} seed {seed}: Acc@0.5 {res['grounding']['acc50']:.3f}, pointing "
                f"{res['grounding']['pointing']:.3f}, mAP@0.5 {res['detection']['map50']:.3f}, "
                f"i2t R@1 {res['retrieval']['i2t_r1']:.3f}")
    table, summary = comparison_table(results, title=title)
    table += "\n\n### Per seed\n\n" + per_seed_table(results, seeds) + (
        f"\n\nEvaluation seed of each run: {eval_seed_offset} + its training seed." if eval_seed_offset is not None
        else "")
    train_s = [r["train_seconds"] for r in runs if r.get("train_seconds")]
    table += ("\n\nTraining wall time per run: "
              + (", ".join(f"{r['objective']}/s{r['seed']} {r['train_seconds']:.0f} s" for r in runs
                           if r.get("train_seconds")) if train_s else "reused runs") + ".")
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    payload = {"settings": {"seeds": list(seeds), "steps": steps, "batch_size": batch_size,
                            "dataset_type": dataset_type, "train_size": train_size,
                            "arms": {k: {"objective": o, "model_config": c, "steps": (arm_steps or {}).get(k, steps),
                                         "train_args": list(train_extra) + list((arm_train_extra or {}).get(k, ()))}
                                     for k, (o, c) in arms.items()},
                            "objectives": list(arms), "eval": eval_opts or {}, "eval_seed_offset": eval_seed_offset},
               "runs": runs, "summary": summary,
               "per_seed": {k: [{p: _get(r, p) for p, _ in METRICS} for r in results[k]] for k in arms}}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    payload["table"] = table
    return payload


def _common_args(c: argparse.ArgumentParser, steps: int, out: str) -> None:
    c.add_argument("--steps", type=int, default=steps)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--batch-size", type=int, default=64, help="global batch size")
    c.add_argument("--dataset-type", default="synthetic", choices=("synthetic", "fashion", "emoji"))
    c.add_argument("--train-size", type=int, default=None, help="training scenes (default: train.py's)")
    c.add_argument("--model-config", default=None, help="JSON of LoupeConfig overrides, passed to train.py")
    c.add_argument("--procs", type=int, default=1, help="processes per training run (--num_accelerators)")
    c.add_argument("--out", default=out)
    c.add_argument("--reuse", action="store_true", help="reuse runs whose model.pt already has --steps steps")
    c.add_argument("--num-test", type=int, default=500)
    c.add_argument("--num-compositional", type=int, default=500)
    c.add_argument("--num-single", type=int, default=500)
    c.add_argument("--num-hard", type=int, default=500)
    c.add_argument("--num-relation", type=int, default=500)
    c.add_argument("--eval-seed", type=int, default=None,
                   help="seed of the evaluation scenes (default: each run's training seed)")
    c.add_argument("--eval-seed-offset", type=int, default=None,
                   help="evaluate each run on the scenes of seed OFFSET + its training seed (the final table: 100)")
    c.add_argument("--validation", action="store_true",
                   help="evaluate on the validation streams (val, val_hard, val_relation): for choosing settings")
    c.add_argument("--no-figures", action="store_true")
    c.add_argument("--train-arg", action="append", default=[],
                   help="extra argument passed to train.py (repeatable), e.g. --train-arg=--lr=2e-3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loupe.experiments",
                                 description="Experiments: the comparison of objectives and the ablation of LOUPE.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="train the objectives alike, evaluate all, write one table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common_args(c, 400, "runs/compare")
    c.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    c.add_argument("--objective-config", action="append", default=[], metavar="OBJECTIVE=JSON",
                   help="LoupeConfig overrides of one objective only (repeatable), e.g. "
                        "--objective-config 'filip={\"text_center_words\": false}'")
    c.add_argument("--objective-train-arg", action="append", default=[], metavar="OBJECTIVE=FLAG",
                   help="a train.py flag of one objective only (repeatable), e.g. --objective-train-arg clip=--lr=2e-3")
    c.add_argument("--compute-matched-clip", type=float, default=None, metavar="RATIO",
                   help="add the arm clip_matched: CLIP trained for RATIO x --steps, RATIO being LOUPE's step "
                        "cost over CLIP's from the step benchmark (benchmarks/RESULTS.md)")
    c.add_argument("--post-hoc-centring", nargs="+", default=[], choices=OBJECTIVES, metavar="OBJECTIVE",
                   help="evaluate these objectives with word tokens centred on their caption, whatever they were "
                        "trained with (FILIP's best variant: trained without --model-config centring)")
    t = sub.add_parser("table", help="the tables of finished runs from their eval.json (nothing is trained or "
                                     "evaluated), e.g. after runs of one comparison were split over processes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", required=True, help="the --out of the comparison or ablation")
    t.add_argument("--seeds", type=int, nargs="+", required=True)
    t.add_argument("--arms", nargs="+", default=None, help="default: every arm with a run for every seed")
    t.add_argument("--dataset-type", default="synthetic", choices=("synthetic", "fashion", "emoji"))
    t.add_argument("--eval-seed-offset", type=int, default=None,
                   help="check that every run was evaluated on the test scenes of seed OFFSET + its training seed")
    t.add_argument("--title", default="")
    t.add_argument("--name", default="table", help="writes OUT/NAME.md and OUT/NAME.json")
    k = sub.add_parser("collapse", help="the register-collapse signals of finished runs, per seed (training log "
                                        "and evaluation; issue 19 item 4): OUT/NAME.md, .json, .png",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("--out", required=True, help="the --out of the comparison or ablation")
    k.add_argument("--seeds", type=int, nargs="+", required=True)
    k.add_argument("--arm", default="loupe", help="the runs OUT/DATASET/ARM-seedS")
    k.add_argument("--dataset-type", default="synthetic", choices=("synthetic", "fashion", "emoji"))
    k.add_argument("--title", default="")
    k.add_argument("--name", default="collapse", help="writes OUT/NAME.md, .json and .png")
    k.add_argument("--no-figures", action="store_true")
    b = sub.add_parser("ablate", help="LOUPE at its defaults against the same run with one part taken out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common_args(b, 600, "runs/ablate")
    b.add_argument("--variants", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    a = ap.parse_args(argv)
    if a.cmd == "collapse":
        try:
            res = collapse_report(a.out, a.seeds, a.arm, a.dataset_type, a.name, a.title, figure=not a.no_figures)
        except (FileNotFoundError, ValueError) as e:
            ap.error(str(e))
        print(res["table"])
        print(f"\nwrote {os.path.join(a.out, a.name + '.md')}, {a.name}.json" + ("" if a.no_figures else f", {a.name}.png"))
        return 0
    if a.cmd == "table":
        try:
            res = table_from_runs(a.out, a.seeds, a.arms, a.dataset_type, a.title, a.name, a.eval_seed_offset)
        except (FileNotFoundError, ValueError) as e:
            ap.error(str(e))
        print(res["table"])
        print(f"\nwrote {os.path.join(a.out, a.name + '.md')} and {a.name}.json")
        return 0
    if a.steps < 1 or a.batch_size < 1 or a.procs < 1:
        ap.error("--steps, --batch-size and --procs must be >= 1")
    if a.eval_seed is not None and a.eval_seed_offset is not None:
        ap.error("give --eval-seed or --eval-seed-offset, not both")
    if a.eval_seed_offset is not None and a.eval_seed_offset < 0:
        ap.error("--eval-seed-offset must be >= 0")
    common = dict(seeds=a.seeds, steps=a.steps, batch_size=a.batch_size, dataset_type=a.dataset_type,
                  train_size=a.train_size, model_config=a.model_config, procs=a.procs, reuse=a.reuse,
                  train_extra=a.train_arg, eval_seed_offset=a.eval_seed_offset,
                  eval_opts={"num_test": a.num_test, "num_compositional": a.num_compositional,
                             "num_single": a.num_single, "num_hard": a.num_hard, "num_relation": a.num_relation,
                             "eval_seed": a.eval_seed, "validation": a.validation, "figures": not a.no_figures,
                             "progress": False})
    if a.cmd == "compare":
        per = {}
        for item in a.objective_config:
            name, sep, js = item.partition("=")
            if not sep or name not in OBJECTIVES:
                ap.error(f"--objective-config expects OBJECTIVE=JSON with OBJECTIVE in {OBJECTIVES}, got {item!r}")
            try:
                per[name] = merge_config(per.get(name), json.loads(js))
            except (json.JSONDecodeError, AttributeError) as e:
                ap.error(f"--objective-config {name}: not a JSON object ({e})")
        if a.compute_matched_clip is not None and not (math.isfinite(a.compute_matched_clip)
                                                       and a.compute_matched_clip >= 1.0):
            ap.error(f"--compute-matched-clip is LOUPE's step cost over CLIP's: a number >= 1, "
                     f"not {a.compute_matched_clip}")
        targs: dict[str, list[str]] = {}
        for item in a.objective_train_arg:
            name, sep, flag = item.partition("=")
            if not sep or name not in OBJECTIVES or not flag.startswith("--"):
                ap.error(f"--objective-train-arg expects OBJECTIVE=--flag[=value] with OBJECTIVE in {OBJECTIVES}, "
                         f"got {item!r}")
            targs.setdefault(name, []).append(flag)
        res = compare(a.out, objectives=a.objectives, post_hoc_centring=a.post_hoc_centring, objective_configs=per,
                      compute_matched_clip=a.compute_matched_clip, objective_train_args=targs, **common)
    else:
        res = ablate(a.out, variants=a.variants, **common)
    print(res["table"])
    print(f"\nwrote {os.path.join(a.out, a.cmd + '.md')} and {a.cmd}.json")
    return 0

if __name__ == "__main__":
    sys.exit(main())
