"""loupe.experiments: the comparison table (constructed values) and one real tiny comparison (slow)."""
from __future__ import annotations

import json
import math
import os

import pytest

from loupe import experiments as X

TINY = json.dumps({"vision_width": 32, "vision_layers": 1, "vision_heads": 2, "text_width": 32, "text_layers": 1,
                   "text_heads": 2, "embed_dim": 32, "region_hidden": 32})


def test_summarise_mean_and_sample_std():
    s = X.summarise([0.1, 0.2, 0.6])
    assert s["mean"] == pytest.approx(0.3) and s["n"] == 3
    assert s["std"] == pytest.approx(math.sqrt(((0.2) ** 2 + 0.1 ** 2 + 0.3 ** 2) / 2))
    assert X.summarise([0.5])["std"] == 0.0
    assert X.summarise([None, float("nan")])["n"] == 0


def test_comparison_table_rows_and_cells():
    def res(acc, r1, regions=None):
        g = {"acc50": acc, "pointing": 0.5}
        if regions is not None:
            g["regions"] = {"acc50": regions}
        return {"grounding": g, "retrieval": {"i2t_r1": r1}}
    results = {"clip": [res(0.1, 0.5), res(0.3, 0.7)], "loupe": [res(0.4, 0.6, 0.5), res(0.6, 0.6, 0.7)]}
    table, summary = X.comparison_table(results, title="t")
    assert summary["grounding.acc50"]["clip"]["mean"] == pytest.approx(0.2)
    assert summary["grounding.acc50"]["loupe"]["std"] == pytest.approx(math.sqrt(0.02))
    lines = {ln.split(" | ")[0]: ln for ln in table.splitlines() if ln.startswith("| ")}
    assert lines["| grounding Acc@0.5 (test)"] == "| grounding Acc@0.5 (test) | 20.0 ± 14.1 | 50.0 ± 14.1 |"
    assert lines["| Acc@0.5, objectness regions (test)"].endswith("| - | 60.0 ± 14.1 |")
    assert "| detection mAP@0.5" not in lines  # no model has it: the row is left out
    one, _ = X.comparison_table({"clip": [res(0.1, 0.5)]})
    assert "| grounding Acc@0.5 (test) | 10.0 |" in one  # one seed: no spread


def test_train_command_same_settings_for_every_objective(tmp_path):
    cmds = [X.train_command(str(tmp_path / o), o, 1, 50, 16, "synthetic", 300, TINY) for o in X.OBJECTIVES]
    strip = lambda c: [x for i, x in enumerate(c) if i == 0 or c[i - 1] not in ("--output", "--objective",  # noqa
                                                                                 "--master_port")]
    assert strip(cmds[0]) == strip(cmds[1]) == strip(cmds[2])
    c = cmds[2]
    assert c[c.index("--objective") + 1] == "loupe" and c[c.index("--steps") + 1] == "50"
    assert c[c.index("--seed") + 1] == "1" and c[c.index("--batch-size") + 1] == "16"
    assert c[c.index("--model-config") + 1] == TINY


def test_compare_rejects_unknown_objective(tmp_path):
    with pytest.raises(ValueError, match="objective"):
        X.compare(str(tmp_path), objectives=["clip", "blip"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compare_end_to_end_tiny(tmp_path):
    logs = []
    out = str(tmp_path / "cmp")
    res = X.compare(out, seeds=[0], steps=2, batch_size=8, train_size=128, model_config=TINY,
                    objectives=["clip", "loupe"], eval_opts={"num_test": 20, "num_compositional": 10,
                                                             "num_single": 10, "num_hard": 8, "num_relation": 8,
                                                             "figures": False, "progress": False},
                    eval_seed_offset=100, compute_matched_clip=1.5, log=logs.append)
    assert [r["eval_seed"] for r in res["runs"]] == [100, 100, 100]
    # the compute-matched CLIP arm: CLIP for 1.5 x 2 = 3 steps, in the table as its own column
    with open(os.path.join(out, "synthetic", "clip_matched-seed0", "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model"]["objective"] == "clip" and cfg["train"]["steps"] == 3
    assert [r["steps"] for r in res["runs"]] == [2, 2, 3] and "clip_matched" in res["table"]
    assert "### Per seed" in res["table"] and "| seed 0 |" in res["table"]
    assert os.path.exists(os.path.join(out, "compare.md")) and os.path.exists(os.path.join(out, "compare.json"))
    for o in ("clip", "loupe"):
        run = os.path.join(out, "synthetic", f"{o}-seed0")
        assert os.path.exists(os.path.join(run, "model.pt")) and os.path.exists(os.path.join(run, "eval.json"))
        with open(os.path.join(run, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["model"]["objective"] == o and cfg["train"]["seed"] == 0 and cfg["train"]["steps"] == 2
    s = res["summary"]["grounding.acc50"]
    assert s["clip"]["n"] == 1 and 0.0 <= s["loupe"]["mean"] <= 1.0
    assert res["summary"]["grounding.regions.acc50"]["clip"]["n"] == 0  # CLIP has no trained region head
    # a second call reuses the trained runs
    logs.clear()
    X.compare(out, seeds=[0], steps=2, batch_size=8, train_size=128, model_config=TINY, objectives=["clip"],
              reuse=True, eval_opts={"num_test": 10, "num_compositional": 0, "num_single": 10, "num_hard": 0, "num_relation": 0, "figures": False,
                                     "progress": False}, log=logs.append)
    assert any("reuse" in m for m in logs) and not any("train clip" in m for m in logs)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ablate_end_to_end_tiny(tmp_path):
    out = str(tmp_path / "abl")
    res = X.ablate(out, seeds=[0], steps=2, batch_size=8, train_size=128, model_config=TINY,
                   variants=["loupe", "no_shapley"],
                   eval_opts={"num_test": 10, "num_compositional": 0, "num_single": 10, "num_hard": 6,
                              "num_relation": 6, "figures": False, "progress": False}, log=lambda m: None)
    assert os.path.exists(os.path.join(out, "ablate.md")) and os.path.exists(os.path.join(out, "ablate.json"))
    with open(os.path.join(out, "synthetic", "no_shapley-seed0", "config.json")) as f:
        cfg = json.load(f)["model"]
    assert cfg["loupe_options"]["fsa_labels"] == "similarity" and cfg["loss_weights"]["tsa"] == 0.0
    with open(os.path.join(out, "synthetic", "loupe-seed0", "config.json")) as f:
        assert not (json.load(f)["model"].get("loupe_options") or {}).get("fsa_labels")
    assert res["summary"]["grounding.hard.finding.text_free"]["loupe"]["n"] == 1
    assert "discrimination" in res["table"]
    with pytest.raises(ValueError, match="unknown variant"):
        X.ablate(out, variants=["no_such"])


def test_per_seed_table_columns_and_summary():
    def res(d):
        return {"grounding": {"test": {"finding": {"discrimination": d}}}}
    table = X.per_seed_table({"clip": [res(0.4), res(0.2)], "loupe": [res(0.9), None or {}]}, [5, 6])
    lines = [ln for ln in table.splitlines() if ln.startswith("| discrimination (test)")]
    assert lines[0] == "| discrimination (test) | clip | 40.0 | 20.0 | 30.0 ± 14.1 |"
    assert lines[1] == "| discrimination (test) | loupe | 90.0 | - | 90.0 |"  # a missing value is shown, not hidden
    assert "seed 5 | seed 6" in table.splitlines()[0]
    assert "i2t R@1" not in table  # no run has it: the row is left out


def test_eval_seed_offset_is_checked(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        X.compare(str(tmp_path), objectives=["clip"], eval_opts={"eval_seed": 3}, eval_seed_offset=100)
    with pytest.raises(ValueError, match="eval_seed_offset"):
        X.compare(str(tmp_path), objectives=["clip"], eval_seed_offset=-1)
    with pytest.raises(SystemExit):
        X.main(["compare", "--eval-seed", "3", "--eval-seed-offset", "100", "--out", str(tmp_path)])


@pytest.fixture
def captured_arms(monkeypatch):
    """What ``compare`` hands to ``run_arms`` (nothing is trained)."""
    seen = {}

    def fake_run_arms(out, arms, name, title, **kw):
        seen.update(arms=arms, title=title, **kw)
        return {"table": ""}
    monkeypatch.setattr(X, "run_arms", fake_run_arms)
    return seen


def test_compute_matched_clip_is_a_step_cost_ratio(tmp_path, captured_arms):
    seen = captured_arms
    X.compare(str(tmp_path), objectives=["loupe"], steps=600, compute_matched_clip=1.9,
              objective_configs={"loupe": {"embed_dim": 32}})
    assert seen["arms"]["clip_matched"] == ("clip", None) and seen["arm_steps"] == {"clip_matched": 1140}
    assert "1140 steps" in seen["title"]
    for bad in (0.5, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="compute_matched_clip"):
            X.compare(str(tmp_path), objectives=["loupe"], compute_matched_clip=bad)
    with pytest.raises(SystemExit):
        X.main(["compare", "--compute-matched-clip", "0.5", "--out", str(tmp_path)])


def test_objective_train_args_reach_their_arms_only(tmp_path, captured_arms):
    seen = captured_arms
    X.main(["compare", "--objectives", "clip", "loupe", "--objective-train-arg", "clip=--lr=2e-3",
            "--compute-matched-clip", "1.5", "--train-arg=--hard-mix=0", "--out", str(tmp_path)])
    assert seen["arm_train_extra"] == {"clip": ["--lr=2e-3"], "loupe": [], "clip_matched": ["--lr=2e-3"]}
    assert seen["train_extra"] == ["--hard-mix=0"] and "clip trained with --lr=2e-3" in seen["title"]
    with pytest.raises(ValueError, match="not compared"):
        X.compare(str(tmp_path), objectives=["loupe"], objective_train_args={"sparc": ["--lr=1"]})
    with pytest.raises(ValueError, match="list of strings"):
        X.compare(str(tmp_path), objectives=["loupe"], objective_train_args={"loupe": "--lr=1"})
    for bad in ("clip:--lr=1", "blip=--lr=1", "clip=lr"):
        with pytest.raises(SystemExit):
            X.main(["compare", "--objective-train-arg", bad, "--out", str(tmp_path)])


def test_a_later_flag_wins_in_the_training_command(tmp_path):
    """Per-objective flags come after the shared ones, and train.py's parser takes the last one."""
    import loupe.train as train_mod
    cmd = X.train_command(str(tmp_path / "r"), "clip", 0, 5, 8, "synthetic", extra=["--lr=1e-3", "--lr=2e-3"])
    args = train_mod.parse_args(cmd[cmd.index("--output"):])
    assert args.lr == 2e-3


def test_post_hoc_centring_names_a_compared_objective(tmp_path):
    with pytest.raises(ValueError, match="not compared"):
        X.compare(str(tmp_path), objectives=["clip"], post_hoc_centring=["filip"])
    with pytest.raises(ValueError, match="unknown objective"):
        X.compare(str(tmp_path), objectives=["clip"], post_hoc_centring=["blip"])


def test_objective_configs_apply_to_their_objective_only(tmp_path, monkeypatch):
    seen = {}

    def fake_run_arms(out, arms, name, title, **kw):
        seen.update(arms=arms, title=title)
        return {"table": ""}
    monkeypatch.setattr(X, "run_arms", fake_run_arms)
    X.compare(str(tmp_path), objectives=["loupe", "filip"], model_config='{"embed_dim": 32}',
              objective_configs={"filip": {"text_center_words": False}})
    assert seen["arms"]["filip"] == ("filip", {"embed_dim": 32, "text_center_words": False})
    assert seen["arms"]["loupe"] == ("loupe", {"embed_dim": 32})
    assert "filip:" in seen["title"]
    with pytest.raises(ValueError, match="not compared"):
        X.compare(str(tmp_path), objectives=["clip"], objective_configs={"filip": {}})
    X.main(["compare", "--objectives", "clip", "filip", "--objective-config", 'filip={"text_center_words": false}',
            "--out", str(tmp_path)])
    assert seen["arms"]["filip"] == ("filip", {"text_center_words": False}) and seen["arms"]["clip"] == ("clip", None)
    with pytest.raises(SystemExit):
        X.main(["compare", "--objective-config", "filip=[1]", "--out", str(tmp_path)])


def _fake_eval(tmp_path, arm, seed, eval_seed, hard, validation=False, finding=True):
    d = tmp_path / "synthetic" / f"{arm}-seed{seed}"
    d.mkdir(parents=True)
    g = {"acc50": hard / 2, "hard": {"finding": {"discrimination": hard, "own_acc50": hard / 4}}}
    if finding:
        g["test"] = {"finding": {"text_free": 0.5, "attribute_color": 0.9, "attribute_shape": 0.8,
                                 "text_free_caption": {"own_acc50": 0.1, "any_acc50": 0.2}}}
    (d / "eval.json").write_text(json.dumps({"data": {"eval_seed": eval_seed, "validation": validation},
                                             "grounding": g}))


def test_table_from_runs_reads_finished_runs_only(tmp_path):
    """The tables of runs split over processes, from their eval.json: every arm with a run for every
    seed, per-seed values, the bars; a missing run or one evaluated on other scenes is named."""
    for arm, vals in (("loupe", (0.4, 0.6)), ("clip", (0.1, 0.3)), ("clip_matched", (0.2, 0.2))):
        for seed, v in zip((10, 11), vals):
            _fake_eval(tmp_path, arm, seed, 100 + seed, v)
    _fake_eval(tmp_path, "filip", 10, 110, 0.5)  # no seed 11: left out
    res = X.table_from_runs(str(tmp_path), [10, 11], eval_seed_offset=100, title="t")
    assert res["arms"] == ["clip", "loupe", "clip_matched"]
    assert res["summary"]["grounding.hard.finding.discrimination"]["loupe"]["mean"] == pytest.approx(0.5)
    assert res["per_seed"]["clip"]["11"]["grounding.hard.finding.discrimination"] == pytest.approx(0.3)
    text = (tmp_path / "table.md").read_text()
    assert "| discrimination (hard) | loupe | 40.0 | 60.0 | 50.0 ± 14.1 |" in text
    assert "| test | colour-only | 90.0 | 90.0 |" in text and "| test | 10.0 / 20.0 |" in text
    assert json.loads((tmp_path / "table.json").read_text())["seeds"] == [10, 11]
    with pytest.raises(FileNotFoundError, match="filip-seed11"):
        X.table_from_runs(str(tmp_path), [10, 11], arms=["filip"])
    _fake_eval(tmp_path, "sparc", 10, 10, 0.3)
    _fake_eval(tmp_path, "sparc", 11, 111, 0.3, validation=True)
    with pytest.raises(ValueError, match="seed 10.*not on the test scenes of seed 110"):
        X.table_from_runs(str(tmp_path), [10], arms=["sparc"], eval_seed_offset=100)
    with pytest.raises(ValueError, match="validation"):
        X.table_from_runs(str(tmp_path), [11], arms=["sparc"], eval_seed_offset=100)
    assert X.main(["table", "--out", str(tmp_path), "--seeds", "10", "11", "--name", "cli"]) == 0
    assert (tmp_path / "cli.md").exists()
    with pytest.raises(SystemExit):
        X.main(["table", "--out", str(tmp_path / "none"), "--seeds", "10"])


def _fake_log(tmp_path, seed, top, cos=0.5, last=600, diag_every=50, arm="loupe"):
    """A log.jsonl whose top-patch share is ``top(step)``; losses on every step, signals every 50."""
    d = tmp_path / "synthetic" / f"{arm}-seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "log.jsonl", "w") as f:
        for step in range(1, last + 1):
            rec = {"step": step, "loss": 1.0}
            if step % diag_every == 0:
                rec.update(val_top_patch_share=top(step), val_patch_pair_cos=cos, val_phrase_map_corr=None,
                           val_inside_above_outside=0.8)
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 601, "lo')  # a torn last line is skipped
    return d


def test_collapse_report_rise_flatness_and_localisation(tmp_path):
    """Issue 19 item 4: per seed the signals' mean over (T/3, T/2] and over the last sixth, the rise
    and whether it is flat; from eval.json whether the run localises (inside > outside, pointing
    above chance, discrimination above the text-free bar); missing logs and logs without the
    signals are named."""
    _fake_log(tmp_path, 20, lambda s: 0.2)  # flat
    _fake_log(tmp_path, 21, lambda s: 0.2 if s <= 300 else 0.5)  # rises by 0.3: collapse
    d22 = _fake_log(tmp_path, 22, lambda s: 0.2 + 0.05 * (s > 300))  # rises by half of FLAT_RISE: flat
    ev = {"grounding": {"pointing": 0.4, "chance_pointing": 0.1, "acc50": 0.3,
                        "test": {"map_diagnostics": {"top_patch_share": 0.2, "patch_pair_cos": 0.8,
                                                     "inside_above_outside": 0.9},
                                 "finding": {"discrimination": 0.9, "text_free": 0.5}}}}
    (d22 / "eval.json").write_text(json.dumps(ev))
    res = X.collapse_report(str(tmp_path), [20, 21, 22], figure=True, title="t")
    sig = {s: res["runs"][str(s)]["signals"]["val_top_patch_share"] for s in (20, 21, 22)}
    assert sig[20]["early"] == pytest.approx(0.2) and sig[20]["rise"] == pytest.approx(0.0) and sig[20]["flat"]
    # early window: steps 250, 300 (0.2); late: 550, 600 (0.5)
    assert sig[21]["early"] == pytest.approx(0.2) and sig[21]["late"] == pytest.approx(0.5)
    assert sig[21]["flat"] is False
    assert sig[22]["rise"] == pytest.approx(0.05) and sig[22]["flat"] and X.FLAT_RISE == 0.10
    assert res["runs"]["20"]["signals"]["val_phrase_map_corr"] == {"early": None, "late": None, "rise": None,
                                                                    "flat": None}
    assert res["runs"]["22"]["eval"]["localises"] is True and "eval" not in res["runs"]["20"]
    text = (tmp_path / "collapse.md").read_text()
    assert "| 21 | 600 | 20.0 -> 50.0 | 50.0 -> 50.0 | **no** |" in text
    assert "| 22 | 20.0 | 80.0 | 90.0 | 40.0 / 10.0 | 90.0 / 50.0 | 30.0 | yes |" in text
    assert "| 20 | not evaluated |" in text
    assert (tmp_path / "collapse.png").stat().st_size > 0
    # the windows: a signal equal to step / 1000 has the mean of steps 250, 300 early and of 550, 600
    # late; a resumed run's repeated steps count once (the last record), non-finite values not at all
    d25 = _fake_log(tmp_path, 25, lambda s: s / 1000)
    with open(d25 / "log.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 550, "val_top_patch_share": 0.55}) + "\n")
        f.write(json.dumps({"step": 600, "val_top_patch_share": float("nan"), "val_patch_pair_cos": 0.5}) + "\n")
    (d25 / "config.json").write_text(json.dumps({"train": {"steps": 800}}))
    r25 = X.collapse_signals_of_run(str(d25))
    assert r25["signals"]["val_top_patch_share"]["early"] == pytest.approx(0.275)
    assert r25["signals"]["val_top_patch_share"]["late"] == pytest.approx(0.55)  # 600 is NaN now: left out
    assert r25["last_step"] == 600 and r25["steps"] == 800
    X.collapse_report(str(tmp_path), [25], name="c25", figure=False)
    assert "| 25 | 600 (of 800: unfinished) |" in (tmp_path / "c25.md").read_text()
    # each localisation check can fail alone
    for path, value in (("test.map_diagnostics.inside_above_outside", 0.55), ("pointing", 0.1),
                        ("test.finding.discrimination", 0.5)):
        bad = json.loads(json.dumps(ev))
        cur = bad["grounding"]
        *head, last = path.split(".")
        for part in head:
            cur = cur[part]
        cur[last] = value
        (d22 / "eval.json").write_text(json.dumps(bad))
        assert X.collapse_signals_of_run(str(d22))["eval"]["localises"] is False, path
    with pytest.raises(FileNotFoundError, match="loupe-seed23"):
        X.collapse_report(str(tmp_path), [23])
    _fake_log(tmp_path, 24, lambda s: 0.2, diag_every=10_000)
    with pytest.raises(ValueError, match="--diag-every"):
        X.collapse_report(str(tmp_path), [24])
    assert X.main(["collapse", "--out", str(tmp_path), "--seeds", "20", "21", "--name", "cli", "--no-figures"]) == 0
    assert (tmp_path / "cli.md").exists() and not (tmp_path / "cli.png").exists()
    with pytest.raises(SystemExit):
        X.main(["collapse", "--out", str(tmp_path), "--seeds", "23"])


def test_training_subprocesses_import_the_comparisons_own_loupe(tmp_path):
    """``compare`` run from another copy of the package (a clone of a tag, say) trains with that
    copy: its training environment puts the copy first on PYTHONPATH, so ``import loupe`` in the
    subprocess (as in ``train.py``, which imports the installed package) finds the copy."""
    import shutil
    import subprocess
    import sys

    import loupe

    clone = tmp_path / "clone"
    shutil.copytree(os.path.dirname(loupe.__file__), clone / "loupe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    show_env = ("import json, loupe.experiments as e; print(json.dumps(e.train_env()))")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", show_env], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    train_env = json.loads(out.stdout.strip().splitlines()[-1])
    where = subprocess.run([sys.executable, "-c", "import loupe; print(loupe.__file__)"], cwd=tmp_path,
                           env=train_env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert os.path.realpath(where.stdout.strip()) == os.path.realpath(clone / "loupe" / "__init__.py")
    # and without it the installed package is the one imported
    plain = subprocess.run([sys.executable, "-c", "import loupe; print(loupe.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert os.path.realpath(plain.stdout.strip()) != os.path.realpath(clone / "loupe" / "__init__.py")
