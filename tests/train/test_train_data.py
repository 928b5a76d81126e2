"""The trainer's data and precision options (issues 18, 19, 22): streamed WebDataset shards
(``pipe:`` URLs, ``--streaming``, ``--resampled``), ``--hard-mix``, ``--precision bf16`` on CPU, and the
register-collapse signals in ``log.jsonl``."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

import loupe
import loupe.data as ld
import loupe.train as train_mod
from loupe.metrics import map_diagnostics, patch_pair_cos

from .test_train import launch_cmd, read_log, run

COLLAPSE = train_mod.COLLAPSE_KEYS


# ------------------------------------------------------------------------------------------------
# streamed shards
# ------------------------------------------------------------------------------------------------
def _with_bad_samples(src: str, dst: str) -> None:
    """``src`` with sample 1's caption missing and sample 2's sidecar invalid (a span past the caption)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            if m.name.endswith("00000001.txt"):
                continue
            if m.name.endswith("00000002.json"):
                data = b'{"phrases": [{"span": [0, 9999]}]}'
            ti = tarfile.TarInfo(m.name)
            ti.size = len(data)
            tout.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two training shards of 16 scenes (the first with 2 bad samples) and one validation shard."""
    d = tmp_path_factory.mktemp("shards")
    paths = ld.write_shards(ld.build_dataset("synthetic", "train", seed=0, size=32), str(d / "train"), per_shard=16)
    _with_bad_samples(paths[0], paths[0] + ".bad")
    (d / "train" / "shard-000000.tar.bad").replace(paths[0])
    ld.write_shards(ld.build_dataset("synthetic", "val", seed=0, size=16), str(d / "val"), per_shard=16)
    return d


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_train_from_a_pipe_url_and_log_skipped_samples(tmp_path, shards):
    out = tmp_path / "stream"
    cmd = launch_cmd(out, procs=2, steps=3, objective="loupe", extra=[
        "--dataset-type", "webdataset", "--train-data", f"pipe:cat {shards}/train/shard-{{000000..000001}}.tar",
        "--val-data", f"pipe:cat {shards}/val/shard-000000.tar", "--diag-every", "3", "--eval-every", "3",
        "--workers", "1"])
    p = run(cmd)
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in log)
    # resampled draws by both ranks read the shard with the 2 bad samples: counted over all ranks
    assert [r["skipped"] for r in log] == sorted(r["skipped"] for r in log) and log[-1]["skipped"] >= 2
    assert f"skipped {log[-1]['skipped']} samples" in p.stdout
    for key in COLLAPSE + ("val_loss",):
        assert log[-1][key] is not None, key
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["streaming"] is True and saved["resampled"] is True
    assert json.loads((out / "tokenizer.json").read_text())["type"] == "subword"
    assert loupe.load(str(out)) is not None
    # resuming a streamed run: a fresh draw seeded by the step it resumes at (approximate resume)
    p = run(launch_cmd(out, procs=2, steps=4, objective="loupe", extra=[
        "--dataset-type", "webdataset", "--train-data", f"pipe:cat {shards}/train/shard-{{000000..000001}}.tar",
        "--diag-every", "0", "--resume", "latest"]))
    assert "resumed from step0000003 at step 3" in p.stdout
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["skipped"] >= log[2]["skipped"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_finite_local_stream_runs_epochs_in_step_on_two_processes(tmp_path, shards):
    """``--streaming --no-resampled``: each rank reads one shard per epoch (14 and 16 good samples,
    3 and 4 batches of 4); every rank starts the next epoch when one runs out, so 5 steps cross one."""
    out = tmp_path / "finite"
    run(launch_cmd(out, procs=2, steps=5, extra=[
        "--dataset-type", "webdataset", "--train-data", f"{shards}/train", "--streaming", "--no-resampled",
        "--diag-every", "0"]))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(r["loss"] == r["loss"] for r in log)
    assert log[-1]["skipped"] >= 2


# ------------------------------------------------------------------------------------------------
# --hard-mix
# ------------------------------------------------------------------------------------------------
def test_hard_mix_reaches_the_training_set():
    def train_set(extra):
        args = train_mod.parse_args(["--train-size", "64", "--output", "/tmp/loupe-hard-mix-unused"] + extra)
        return args, train_mod.build_train_set(args, ld, 0, 1, train_mod.data_options(args, 64))

    from loupe.config import HARD_MIX_DEFAULT
    args, default = train_set([])
    assert args.hard_mix == HARD_MIX_DEFAULT == default.hard_mix  # the built-in sets mix by default
    args, plain = train_set(["--hard-mix", "0"])
    assert args.hard_mix == 0.0 and plain.hard_mix == 0.0
    args, mixed = train_set(["--hard-mix", "0.5"])
    assert mixed.hard_mix == 0.5
    changed = sum(plain[i]["caption"] != mixed[i]["caption"] for i in range(64))
    assert 16 <= changed <= 48  # about half the scenes come from the controlled streams
    # the controlled scenes hold distractors: more objects than named phrases
    assert any(len(mixed[i]["all_boxes"]) > len(mixed[i]["boxes"]) for i in range(64))


@pytest.mark.parametrize("args, words", [
    (["--hard-mix", "1.5"], "--hard-mix must be in [0, 1]"),
    (["--hard-mix", "0.3", "--dataset-type", "csv", "--train-data", __file__], "does not apply to --dataset-type csv"),
    (["--streaming"], "--streaming reads --dataset-type webdataset"),
])
def test_data_flag_errors(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.parse_args(args + ["--output", "/tmp/loupe-flags-unused"])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_hard_mix_default_is_off_for_csv_and_webdataset():
    for kind in ("csv", "webdataset"):
        args = train_mod.parse_args(["--dataset-type", kind, "--train-data", __file__,
                                     "--output", "/tmp/loupe-flags-unused"])
        assert args.hard_mix == 0.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hard_mix_run_saves_the_setting(tmp_path):
    out = tmp_path / "mix"
    run(launch_cmd(out, steps=2, extra=["--hard-mix", "0.25", "--diag-every", "0"]))
    assert json.loads((out / "config.json").read_text())["train"]["hard_mix"] == 0.25
    assert [r["step"] for r in read_log(out)] == [1, 2]


# ------------------------------------------------------------------------------------------------
# --precision bf16 on CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", ["filip", "loupe"])
def test_bf16_training_on_cpu_is_finite_and_its_checkpoint_loads(tmp_path, objective):
    out = tmp_path / f"bf16-{objective}"
    run(launch_cmd(out, steps=4, objective=objective, extra=["--precision", "bf16", "--diag-every", "2"]))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        for k, v in r.items():
            if k.startswith("loss"):
                assert v is not None and v == v and abs(v) < 1e4, (k, r)
    saved = json.loads((out / "config.json").read_text())
    assert saved["deepspeed"]["bf16"] == {"enabled": True} and saved["train"]["precision"] == "bf16"
    model = loupe.load(str(out))  # the consolidated fp32 weights
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.zeros(2, 3, 64, 64))).all()
    # and the DeepSpeed bf16 checkpoint resumes
    run(launch_cmd(out, steps=5, objective=objective, extra=["--precision", "bf16", "--diag-every", "2",
                                                              "--resume", "latest"]))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and log[-1]["loss"] == log[-1]["loss"]


# ------------------------------------------------------------------------------------------------
# register-collapse signals (issue 19 item 4)
# ------------------------------------------------------------------------------------------------
def test_collapse_signals_are_the_evaluation_definitions():
    g = torch.Generator().manual_seed(0)
    B, P, n, D, grid, patch = 3, 3, 16, 8, 4, 16
    patches = torch.nn.functional.normalize(torch.randn(B, n, D, generator=g), dim=-1)
    phrases = torch.nn.functional.normalize(torch.randn(B, P, D, generator=g), dim=-1)
    pmask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    boxes = torch.tensor([[0., 0, 32, 32]]).expand(B, P, 4).clone()
    out = {"patch_tokens": patches, "phrase_feats": phrases, "phrase_mask": pmask}
    got = train_mod.collapse_signals(out, {"boxes": boxes}, grid, patch, torch.device("cpu"), 1)
    bi, pi = pmask.nonzero(as_tuple=True)
    d = map_diagnostics(phrases[bi, pi], patches[bi], boxes[bi, pi].double(), bi, grid, patch)
    best = torch.bincount(d["best_patch"], minlength=n)
    assert got["val_top_patch_share"] == pytest.approx(float(best.max()) / len(bi))
    assert got["val_patch_pair_cos"] == pytest.approx(float(patch_pair_cos(patches).mean()))
    assert got["val_phrase_map_corr"] == pytest.approx(float(d["pair_corr"].mean()))
    io = d["inside_minus_outside"]
    assert got["val_inside_above_outside"] == pytest.approx(float((io > 0).double().mean()))
    # maps that localise: each phrase is the patch inside its box (patch 0, in the top-left 32x32)
    loc = {"patch_tokens": patches, "phrase_feats": patches[:, :1].expand(B, P, D).contiguous(), "phrase_mask": pmask}
    assert train_mod.collapse_signals(loc, {"boxes": boxes}, grid, patch, torch.device("cpu"), 1)[
        "val_inside_above_outside"] == 1.0
    # one patch that every phrase prefers (a register): share 1
    u = torch.zeros(D)
    u[0] = 1.0
    reg = patches.clone()
    reg[:, 5] = 10 * u
    near_u = torch.nn.functional.normalize(u + 0.1 * torch.randn(B, P, D, generator=g), dim=-1)
    got = train_mod.collapse_signals({"patch_tokens": reg, "phrase_feats": near_u, "phrase_mask": pmask}, {},
                                     grid, patch, torch.device("cpu"), 1)
    assert got["val_top_patch_share"] == 1.0
    # no phrases: the phrase signals are None, the patch signal stays
    got = train_mod.collapse_signals({**out, "phrase_mask": torch.zeros_like(pmask)}, {}, grid, patch,
                                     torch.device("cpu"), 1)
    assert got["val_top_patch_share"] is None and got["val_phrase_map_corr"] is None
    assert got["val_inside_above_outside"] is None
    assert got["val_patch_pair_cos"] is not None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_collapse_signals_are_logged_and_leave_training_unchanged(tmp_path):
    run(launch_cmd(tmp_path / "diag", steps=4, objective="loupe", extra=["--diag-every", "2"]))
    run(launch_cmd(tmp_path / "none", steps=4, objective="loupe", extra=["--diag-every", "0"]))
    diag, none = read_log(tmp_path / "diag"), read_log(tmp_path / "none")
    for r in diag:
        if r["step"] % 2 == 0:
            assert 0.0 < r["val_top_patch_share"] <= 1.0 and -1.0 <= r["val_patch_pair_cos"] <= 1.0
            assert -1.0 <= r["val_phrase_map_corr"] <= 1.0 and 0.0 <= r["val_inside_above_outside"] <= 1.0
        else:
            assert not any(k in r for k in COLLAPSE)
    assert not any(k in r for r in none for k in COLLAPSE)
    for a, b in zip(diag, none):  # the no-gradient validation pass changes nothing of the training
        assert a["loss"] == b["loss"] and a["loss_fsa"] == b["loss_fsa"]
