"""The training job through the real `deepspeed` launcher, on CPU with gloo, small and short."""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import loupe
import loupe.train as train_mod

TRAIN = train_mod.__file__
TINY = json.dumps({"vision_width": 32, "vision_layers": 1, "vision_heads": 2, "text_width": 32,
                   "text_layers": 1, "text_heads": 2, "embed_dim": 32, "region_hidden": 32})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def launch_cmd(out, procs=1, steps=4, zero=2, objective="filip", extra=()):
    return (["deepspeed", "--num_accelerators", str(procs), "--master_port", str(free_port()), TRAIN,
             "--output", str(out), "--steps", str(steps), "--zero-stage", str(zero), "--objective", objective,
             "--batch-size", "8", "--train-size", "256", "--lr", "2e-3", "--warmup", "0", "--save-every", "2",
             "--seed", "3", "--no-eval", "--no-progress", "--model-config", TINY] + list(extra))


def run(cmd, timeout=300):
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
    return p


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_release_shm_buffer_removes_only_this_ranks_buffer(monkeypatch, tmp_path):
    from loupe.train import release_shm_buffer
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    port = str(free_port())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    mine = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_1"
    other = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    for path in (mine, other):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        assert release_shm_buffer(1) == mine
        assert not os.path.exists(mine) and os.path.exists(other)
        assert release_shm_buffer(1) is None  # already gone: nothing to do
    finally:
        for path in (mine, other):
            if os.path.exists(path):
                os.unlink(path)


def test_help_lists_the_flags():
    p = subprocess.run([sys.executable, TRAIN, "--help"], env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for flag in ("--dataset-type", "--train-data", "--batch-size", "--steps", "--lr", "--warmup", "--seed",
                 "--output", "--resume", "--objective", "--eval-every", "--zero-stage", "--precision",
                 "--report-to", "--deepspeed_config"):
        assert flag in p.stdout, flag


@pytest.mark.parametrize("args, words", [
    (["--dataset-type", "csv"], "needs --train-data"),
    (["--dataset-type", "csv", "--train-data", "/nonexistent.csv"], "does not exist"),
    (["--steps", "0"], "--steps"),
    (["--objective", "nope"], "invalid choice"),
    (["--model-config", "{\"vision_layers\": 0}"], "vision_layers"),
])
def test_bad_flags_give_clear_errors(args, words):
    p = subprocess.run([sys.executable, TRAIN] + args, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert words in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_one_process_trains_saves_and_loads(tmp_path, zero):
    out = tmp_path / f"z{zero}"
    cmd = launch_cmd(out, steps=6, zero=zero)
    run(cmd)
    # DeepSpeed's CPU shared-memory allreduce buffer of this run is gone (it would leak 67 MB of RAM)
    port = cmd[cmd.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    for key in ("loss", "loss_cmc", "loss_filip", "samples_per_s", "lr", "logit_scale", "data_time"):
        assert all(key in r and r[key] == r[key] for r in log), key
    assert sum(r["loss"] for r in log[-2:]) < sum(r["loss"] for r in log[:2])  # it learns
    for name in ("model.pt", "config.json", "tokenizer.json", "checkpoints/latest"):
        assert (out / name).exists(), name
    model = loupe.load(str(out))
    assert not model.training
    with torch.no_grad():
        emb = model.encode_image(torch.zeros(2, 3, 64, 64))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    run(launch_cmd(tmp_path / "p1", procs=1, steps=3))
    run(launch_cmd(tmp_path / "p2", procs=2, steps=3))
    l1, l2 = read_log(tmp_path / "p1"), read_log(tmp_path / "p2")
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        # same global batch, gathered contrastive losses with local loss: same gradients, so the
        # same trajectory up to float32 reduction order
        for key in ("loss", "loss_cmc", "loss_filip"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a, b)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_kill_and_resume_matches_uninterrupted(tmp_path, zero):
    full = tmp_path / "full"
    run(launch_cmd(full, steps=6, zero=zero))
    part = tmp_path / "part"
    killed_cmd = launch_cmd(part, steps=6, zero=zero)
    p = subprocess.Popen(killed_cmd, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    log = part / "log.jsonl"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # kill between the checkpoints of steps 2 and 4
            if log.exists() and any(json.loads(x)["step"] >= 3 for x in log.read_text().splitlines() if x):
                break
            if p.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.01)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        # a killed run cannot unlink DeepSpeed's shared-memory buffer (loupe.train.release_shm_buffer)
        port = killed_cmd[killed_cmd.index("--master_port") + 1]
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            os.unlink(path)
    ckpt_step = int((part / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    logged = max(json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip())
    assert logged > ckpt_step  # killed between checkpoints: the resume must drop log lines
    run(launch_cmd(part, steps=6, zero=zero, extra=["--resume", "latest"]))
    a, b = read_log(full), read_log(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_cmc", "loss_filip", "lr"):
            assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (key, ra, rb)
