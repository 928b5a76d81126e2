"""Reports of an evaluation: PNG figures (matplotlib, Agg) and the Markdown table."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from .checkpoint import write_atomic
from .data import Collator
from .regions import phrase_features

__all__ = ["write_figures", "markdown_table", "write_report", "get_path", "REQUIRED_PATHS", "figure_grounding_examples",
           "figure_interaction_maps", "figure_detection_per_class", "figure_training_curves"]


# ------------------------------------------------------------------------------------------------
# figures (matplotlib, Agg)
# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _draw_box(ax, box, color, label=None) -> None:
    from matplotlib.patches import Rectangle
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.8,
                           label=label))


def figure_grounding_examples(examples: list[dict], path: str) -> str:
    """Images with a phrase, its true box (green) and the predicted box (red)."""
    plt = _plt()
    n = max(1, len(examples))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, examples):
        ax.imshow(np.transpose(e["image"], (1, 2, 0)))
        _draw_box(ax, e["true"], "lime", "true")
        _draw_box(ax, e["pred"], "red", "predicted")
        ax.set_title(f"\"{e['phrase']}\"\nIoU {e['iou']:.2f}", fontsize=8)
    if examples:
        axes.flat[0].legend(loc="lower left", fontsize=6, framealpha=0.6)
    fig.suptitle("Phrase grounding (fixed rule: sum over the box of <p, x_i> - q70(p)): true green, predicted red",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def figure_interaction_maps(model, ds, path: str, num_captions: int = 3) -> str:
    """Patch-phrase cosine similarity maps of a few captions (what the token-level interaction sees)."""
    plt = _plt()
    items = [ds[i] for i in range(min(num_captions, len(ds)))]
    batch = Collator(model.tokenizer, max_length=min(32, model.config.context_length))(items)
    dev = model.logit_scale.device
    _, patches = model.encode_image_tokens(batch["images"].to(dev))
    _, words, wmask = model.encode_text_tokens(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    pf, pm = phrase_features(words, wmask & batch["word_mask"].to(dev), batch["phrase_spans"].to(dev),
                             batch["phrase_mask"].to(dev))
    g, S = model.grid_size, model.config.image_size
    P = max(1, int(pm.sum(1).max()))
    fig, axes = plt.subplots(len(items), P + 1, figsize=(2.6 * (P + 1), 2.8 * len(items)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for b, it in enumerate(items):
        axes[b, 0].imshow(np.transpose(it["image"].numpy(), (1, 2, 0)))
        axes[b, 0].set_title(batch["captions"][b][:48], fontsize=7)
        for j, p in enumerate(pm[b].nonzero().flatten().tolist()):
            sim = (patches[b].float() @ pf[b, p].float()).reshape(g, g).cpu().numpy()
            ax = axes[b, j + 1]
            ax.imshow(np.transpose(it["image"].numpy(), (1, 2, 0)), alpha=0.45)
            im = ax.imshow(sim, cmap="magma", alpha=0.65, extent=(-0.5, S - 0.5, S - 0.5, -0.5), vmin=-1, vmax=1)
            cs, ce = batch["phrase_char_spans"][b][p]
            ax.set_title(f"\"{batch['captions'][b][cs:ce]}\"", fontsize=7)
            if p < len(it["boxes"]) and bool(torch.isfinite(it["boxes"][p]).all()):
                _draw_box(ax, it["boxes"][p].tolist(), "lime")
    fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, label="cosine(phrase feature, patch token)") \
        if P >= 1 and len(items) and "im" in locals() else None
    fig.suptitle("Patch-phrase similarity maps (cosine of the phrase feature with each patch token; "
                 "not Shapley interactions); true box green", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_detection_per_class(detection: dict, path: str) -> str:
    """Bar chart of per-class AP@0.5 and AP@[.5:.95]."""
    plt = _plt()
    names = list((detection.get("per_class_ap50") or {}).keys())
    a50 = [detection["per_class_ap50"][k] or 0.0 for k in names]
    a = [(detection.get("per_class_ap") or {}).get(k) or 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * max(1, len(names)), 3.2))
    x = np.arange(len(names))
    ax.bar(x - 0.2, a50, 0.4, label="AP@0.5")
    ax.bar(x + 0.2, a, 0.4, label="AP@[.5:.95]")
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP")
    ax.set_title(f"Zero-shot detection with class prompts: mAP@0.5 {detection.get('map50', float('nan')):.3f}, "
                 f"mAP {detection.get('map', float('nan')):.3f}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_training_curves(log_path: str, path: str) -> str | None:
    """Loss terms and learning rate against the step, from a training run's ``log.jsonl``."""
    recs = []
    with open(log_path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    if not recs:
        return None
    plt = _plt()
    steps = [r.get("step") for r in recs]
    keys = sorted({k for r in recs for k, v in r.items() if k.startswith("loss") and isinstance(v, (int, float))})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for k in keys:
        a1.plot(steps, [r.get(k, float("nan")) if r.get(k) is not None else float("nan") for r in recs],
                label=k, linewidth=1.0 if k != "loss" else 1.8)
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.legend(fontsize=6)
    a1.set_title("training losses (log.jsonl)", fontsize=9)
    a2.plot(steps, [r.get("lr", float("nan")) for r in recs], label="lr")
    a2.set_xlabel("step")
    a2.set_ylabel("learning rate (blue)")
    if any("logit_scale" in r for r in recs):
        ax3 = a2.twinx()
        ax3.plot(steps, [r.get("logit_scale", float("nan")) for r in recs], color="tab:orange", label="logit scale")
        ax3.set_ylabel("logit scale (orange)")
    a2.set_title("learning rate and logit scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_collapse_signals(series: dict, path: str, title: str = "") -> str:
    """The register-collapse signals of training logs against the step, one line per run:
    ``series[label][key] = [(step, value), ...]`` for the keys of ``loupe.train.COLLAPSE_KEYS``."""
    plt = _plt()
    keys = list(dict.fromkeys(k for per in series.values() for k in per))
    cols = min(2, max(1, len(keys)))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys):
        for label, per in series.items():
            pts = per.get(k) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.0, label=f"seed {label}")
        ax.set_title(k.replace("val_", "").replace("_", " "), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(-1.0 if ("corr" in k or "cos" in k) else 0.0, 1.0)
        if "inside" in k:
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)  # 0.5: no localisation
        ax.grid(alpha=0.3)
    if keys:
        axes.flat[0].legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(model, test_ds, result: dict, examples: list[dict], directory: str,
                  log_path: str | None = None) -> dict[str, str]:
    """Write the PNG figures into ``directory``; returns name -> path."""
    os.makedirs(directory, exist_ok=True)
    out = {"grounding_examples": figure_grounding_examples(examples, os.path.join(directory, "grounding_examples.png")),
           "interaction_maps": figure_interaction_maps(model, test_ds, os.path.join(directory, "interaction_maps.png"))}
    if result.get("detection"):
        out["detection_per_class"] = figure_detection_per_class(result["detection"],
                                                                os.path.join(directory, "detection_per_class.png"))
    if log_path and os.path.exists(log_path):
        p = figure_training_curves(log_path, os.path.join(directory, "training_curves.png"))
        if p:
            out["training_curves"] = p
    return out


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown_table(result: dict) -> str:
    """A Markdown report of one evaluation (percentages)."""
    r, c, g, d = (result.get(k, {}) or {} for k in ("retrieval", "classification", "grounding", "detection"))
    f = r.get("filip", {})
    lines = [f"## loupe evaluation: objective `{result.get('objective')}`, step {result.get('step')}", "",
             f"Data: {result.get('data', {})}. All numbers in %.", "",
             "| retrieval | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 |",
             "|---|---|---|---|---|---|---|",
             "| global embeddings | " + " | ".join(_fmt(r.get(k)) for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
                                                                           "t2i_r5", "t2i_r10")) + " |",
             "| FILIP token-wise | " + " | ".join(_fmt(f.get(k)) for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
                                                                           "t2i_r5", "t2i_r10")) + " |",
             "", "| classification (single objects) | top-1 | top-5 |", "|---|---|---|",
             f"| shape | {_fmt(c.get('top1'))} | {_fmt(c.get('top5'))} |",
             f"| colour + shape | {_fmt(c.get('color_shape_top1'))} | {_fmt(c.get('color_shape_top5'))} |",
             "", "| grounding | Acc@0.5 | pointing | pointing, word-centred | oracle Acc@0.5 | chance Acc@0.5 "
                 "| chance pointing |",
             "|---|---|---|---|---|---|---|"]
    for split in ("test", "compositional"):
        s = g.get(split, {}) or {}
        lines.append(f"| {split} | {_fmt(s.get('acc50'))} | {_fmt(s.get('pointing'))} "
                     f"| {_fmt(s.get('pointing_word_centred'))} | {_fmt(s.get('oracle_acc50'))} "
                     f"| {_fmt(s.get('chance_acc50'))} | {_fmt(s.get('chance_pointing'))} |")
        for size, row in sorted((s.get("by_size") or {}).items()):
            lines.append(f"| {split}, {size} objects ({row.get('phrases')}) | {_fmt(row.get('acc50'))} | "
                         f"{_fmt(row.get('pointing'))} | | {_fmt(row.get('oracle_acc50'))} | "
                         f"{_fmt(row.get('chance_acc50'))} | |")
    if g.get("regions"):
        lines.append(f"| objectness regions (test / compositional) | {_fmt(g['regions'].get('acc50'))} / "
                     f"{_fmt(g['regions'].get('acc50_compositional'))} | | | | | |")
    finding = [(split, (g.get(split) or {}).get("finding")) for split in
               ("test", "compositional", "hard", "hard_compositional", "relation", "relation_compositional")]
    if any(f for _, f in finding):
        lines += ["", "| finding vs naming (Acc@0.5) | own | any | discrimination (own/any) | pointing own / any "
                  "| text-free bar (1/k) | colour-only bar | shape-only bar | caption box own / any "
                  "| objectness box own / any |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for split, f in finding:
            if not f:
                continue
            tc, to = f.get("text_free_caption") or {}, f.get("text_free_objectness") or {}
            lines.append(f"| {split} ({f.get('phrases')}) | {_fmt(f.get('own_acc50'))} | {_fmt(f.get('any_acc50'))} | "
                         f"{_fmt(f.get('discrimination'))} | {_fmt(f.get('pointing_own'))} / "
                         f"{_fmt(f.get('pointing_any'))} | {_fmt(f.get('text_free'))} | "
                         f"{_fmt(f.get('attribute_color'))} | {_fmt(f.get('attribute_shape'))} | "
                         f"{_fmt(tc.get('own_acc50'))} / {_fmt(tc.get('any_acc50'))} | "
                         f"{_fmt(to.get('own_acc50'))} / {_fmt(to.get('any_acc50'))} |")
        lines += ["", "Own: IoU >= 0.5 with the phrase's box; any: with any object's box; the text-free bar is "
                  "what a perfect object finder that ignores the text gets; the colour-only (size-only for "
                  "catalogs without colours) and shape-only bars pick at random among the objects that match "
                  "the phrase in that attribute; the caption box is the best box of the caption's pooled "
                  "embedding, the objectness box the region head's top box (both ignore the phrase)."]
    diag = (g.get("test") or {}).get("map_diagnostics")
    if diag:
        lines += ["", "| phrase-patch maps (test) | inside > outside | top-patch share | phrase-map correlation "
                  "| patch-pair cosine | chosen / true box area (median) |",
                  "|---|---|---|---|---|---|",
                  f"| | {_fmt(diag.get('inside_above_outside'))} | {_fmt(diag.get('top_patch_share'))} | "
                  f"{_fmt(diag.get('phrase_map_corr'))} | {_fmt(diag.get('patch_pair_cos'))} | "
                  f"{_fmt(diag.get('box_area_ratio'))} |"]
    lines += ["", f"Scoring rule: {g.get('rule', '')}.", "",
              "| detection | mAP@0.5 | mAP@[.5:.95] | " + " | ".join(f"AP50 {k}" for k in (d.get("per_class_ap50") or {})) + " |",
              "|---|---|---|" + "---|" * len(d.get("per_class_ap50") or {}),
              f"| class prompts | {_fmt(d.get('map50'))} | {_fmt(d.get('map'))} | "
              + " | ".join(_fmt(v) for v in (d.get("per_class_ap50") or {}).values()) + " |"]
    if d.get("box_score_only"):
        lines.append(f"| ranked by box score alone | {_fmt(d['box_score_only'].get('map50'))} | "
                     f"{_fmt(d['box_score_only'].get('map'))} |" + " |" * len(d.get("per_class_ap50") or {}))
    return "\n".join(lines)


REQUIRED_PATHS = ("retrieval.i2t_r1", "retrieval.t2i_r1", "classification.top1", "grounding.acc50",
                  "grounding.acc50_compositional", "grounding.oracle_acc50", "grounding.chance_acc50",
                  "grounding.pointing", "grounding.pointing_compositional", "detection.map50", "detection.map")


def write_report(result: dict, out_json: str, markdown: str) -> None:
    """``out_json`` (written atomically) and the Markdown ``markdown`` beside it (``.md``)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    write_atomic(out_json, json.dumps(result, indent=2))
    with open(os.path.splitext(out_json)[0] + ".md", "w") as f:
        f.write(markdown + "\n")


def get_path(d: dict, dotted: str):
    """``d['a']['b']`` for ``'a.b'`` (KeyError naming the path when absent)."""
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur
