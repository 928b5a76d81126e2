"""The training job through the real `deepspeed` launcher, on CPU with gloo, small and short."""
from __future__ import annotations

import glob
import json
import os
import re
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
                 "--report-to", "--deepspeed_config", "--model", "--list-models", "--hard-mix", "--streaming",
                 "--resampled", "--no-resampled", "--diag-every"):
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


@pytest.mark.timeout(900)
def test_uansil_on_end_to_end_logs_what_it_samples_and_fills(tmp_path):
    """The real engine with the UANSIL skip policy on (issue 19): the log holds the fraction of games
    sampled (below 1: the masked-encoder game plays a subsample of its boxes; every SSIM game is
    sampled, the policy never fills those), and after the warm-up the encoder game's targets reach
    more boxes than it plays (the predictor's confident means fill the rest)."""
    out = tmp_path / "uansil"
    cfg = json.loads(TINY)
    cfg["loupe_options"] = {"tsa_game": "encoder", "encoder_images": 1, "encoder_boxes": 2, "encoder_samples": 2,
                            "num_samples": 4, "uansil": True, "uansil_warmup": 3, "uansil_threshold": 1e6,
                            "uansil_min_calibration": 0.0, "uansil_min_skill": None}
    cmd = launch_cmd(out, steps=6, objective="loupe")
    cmd[cmd.index("--model-config") + 1] = json.dumps(cfg)
    run(cmd)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    for r in log:
        for key in ("uansil_fraction_sampled", "uansil_warm", "diag_tsa_target_share", "loss_ua"):
            assert key in r, key
    before = [r for r in log if r["uansil_warm"] == 0.0]
    after = [r for r in log if r["uansil_warm"] == 1.0]
    assert before and after
    assert all(0.0 < r["uansil_fraction_sampled"] < 1.0 for r in log)
    # before the warm-up only the played boxes have a target; after it the filled ones too
    assert min(r["diag_tsa_target_share"] for r in after) > max(r["diag_tsa_target_share"] for r in before)


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


def _with_warmup(cmd, warmup):
    """``cmd`` with ``--warmup warmup`` (None: without the flag, the objective's default)."""
    i = cmd.index("--warmup")
    return cmd[:i] + cmd[i + 2:] + ([] if warmup is None else ["--warmup", str(warmup)])


@pytest.mark.timeout(900)
def test_a_resumed_run_keeps_its_warmup_unless_told_otherwise(tmp_path):
    from loupe.train import lr_lambda
    full, part = tmp_path / "full", tmp_path / "part"
    run(_with_warmup(launch_cmd(full, steps=6), 3))
    run(_with_warmup(launch_cmd(part, steps=4), 3))
    # resumed without --warmup: not the objective's default (40 for filip) but the checkpoint's 3
    p = run(_with_warmup(launch_cmd(part, steps=6, extra=["--resume", "latest"]), None))
    assert "keeps its learning-rate warm-up of 3 steps" in p.stdout + p.stderr
    a, b = read_log(full), read_log(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a[4:], b[4:]):  # the same schedule lr_lambda(3, 6) from the resume on
        assert abs(ra["lr"] - rb["lr"]) <= 1e-9, (ra["step"], ra["lr"], rb["lr"])
    # the lr logged at step s is the schedule's value for the next step, lambda(s)
    assert abs(b[4]["lr"] - 2e-3 * lr_lambda(3, 6)(5)) <= 1e-9
    assert abs(b[4]["lr"] - 2e-3 * lr_lambda(40, 6)(5)) > 1e-5  # what the objective's default would give


def test_default_warmup_per_objective_and_what_a_resume_keeps():
    from loupe.config import WARMUP_DEFAULT, default_warmup
    from loupe.train import resumed_warmup
    assert WARMUP_DEFAULT == 40
    assert default_warmup("loupe", 600) == 200 and default_warmup("loupe", 1200) == 200
    assert default_warmup("loupe", 30) == 10  # at most a third of a short run
    for objective in ("clip", "filip", "sparc"):
        assert default_warmup(objective, 600) == 40 and default_warmup(objective, 30) == 40
    assert resumed_warmup({"step": 4, "warmup": 200}, 40, given=False) == 200
    assert resumed_warmup({"step": 4, "warmup": 200}, 7, given=True) == 7
    assert resumed_warmup({"step": 4}, 200, given=False) == WARMUP_DEFAULT  # saved before the record


# ------------------------------------------------------------------------------------------------
# issue 21: runs that cannot overwrite each other, resume that never restarts silently, no leaked
# shared memory, non-finite training stopped by the trainer
# ------------------------------------------------------------------------------------------------
def start(cmd):
    """A launch in the background, in its own process group; stdout/stderr to text files."""
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(p, out, step, timeout=600):
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log):
            with open(log) as f:
                if any(json.loads(x)["step"] >= step for x in f.read().splitlines() if x.strip()):
                    return
        if p.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{p.stderr.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no step {step} in {timeout} s")


def port_of(cmd) -> str:
    return cmd[cmd.index("--master_port") + 1]


def shm_buffers(port) -> list[str]:
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def test_bad_numbers_and_outputs_are_argparse_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, words in [(["--lr", "nan"], "--lr must be a finite number"),
                        (["--lr", "inf"], "--lr must be a finite number"),
                        (["--wd", "nan"], "--wd must be a finite number"),
                        (["--output", str(a_file)], "is a file, not a directory"),
                        (["--output", str(a_file / "run")], "is a file, so no directory")]:
        p = subprocess.run([sys.executable, TRAIN] + args, env=env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-2000:])


def _hold_lock_in_subprocess(directory):
    code = ("import sys, time; from loupe.checkpoint import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_run_lock_excludes_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    from loupe.checkpoint import RunLock, RunLocked
    holder = _hold_lock_in_subprocess(tmp_path / "run")
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(tmp_path / "run").acquire()
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
        assert "started" in str(e.value)
    finally:
        holder.kill()  # like kill -9: the kernel drops the flock, the file still names the dead holder
        holder.wait()
    lock = RunLock(tmp_path / "run").acquire()
    assert lock.note and f"pid {holder.pid}" in lock.note and "stale" in lock.note
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # a clean release leaves no holder
    again = RunLock(tmp_path / "run").acquire()
    assert again.note is None  # nothing stale after a clean release
    again.release()


def test_run_lock_holder_names_a_live_run_and_nothing_else(tmp_path):
    """What the evaluation reads to warn that a run is still training (it takes no lock itself)."""
    from loupe.checkpoint import RunLock
    assert RunLock.holder(str(tmp_path / "missing")) is None
    holder = _hold_lock_in_subprocess(tmp_path / "run")
    try:
        seen = RunLock.holder(str(tmp_path / "run"))
        assert seen is not None and seen["pid"] == holder.pid
        assert RunLock.holder(str(tmp_path / "run")) is not None  # asking twice takes nothing
    finally:
        holder.kill()
        holder.wait()
    assert RunLock.holder(str(tmp_path / "run")) is None  # dead holder: the kernel dropped its flock
    lock = RunLock(tmp_path / "run").acquire()  # and a new run can still take it
    assert RunLock.holder(str(tmp_path / "run"))["pid"] == os.getpid()
    lock.release()
    assert RunLock.holder(str(tmp_path / "run")) is None


def _fake_tag(ckpt_dir, step, finish=True):
    from loupe.checkpoint import finish_tag
    tag = f"step{step:07d}"
    os.makedirs(ckpt_dir / tag)
    torch.save({"step": step}, ckpt_dir / tag / "mp_rank_00_model_states.pt")
    torch.save({"opt": torch.zeros(100)}, ckpt_dir / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    if finish:
        finish_tag(str(ckpt_dir), tag, step)
    return tag


def test_resolve_resume_validates_latest(tmp_path):
    from loupe.checkpoint import CheckpointError, resolve_resume
    d = tmp_path / "checkpoints"
    t2, t4 = _fake_tag(d, 2), _fake_tag(d, 4)
    assert (d / "latest").read_text() == t4
    assert resolve_resume(str(d), "latest") == (t4, [], [])
    # empty, dangling, missing latest: the newest complete tag, with a warning naming it
    for content, words in (("", "is empty"), ("step0000099", "does not exist"), (None, "is missing")):
        if content is None:
            (d / "latest").unlink()
        else:
            (d / "latest").write_text(content)
        tag, warnings, remove = resolve_resume(str(d), "latest")
        assert tag == t4 and remove == [] and words in warnings[0] and f"resuming from {t4}" in warnings[0]
        with pytest.raises(CheckpointError, match="strict"):
            resolve_resume(str(d), "latest", strict=True)
    # killed between saving a tag and updating latest: the newer complete tag wins
    (d / "latest").write_text(t2)
    tag, warnings, _ = resolve_resume(str(d), "latest")
    assert tag == t4 and "newer and complete" in warnings[0]
    # a tag being written when the run was killed (no manifest) is not complete and gets replaced
    t6 = _fake_tag(d, 6, finish=False)
    (d / "latest").write_text(t4)
    tag, warnings, remove = resolve_resume(str(d), "latest")
    assert tag == t4 and remove == [t6] and t6 in warnings[0]
    # a truncated file of the tag latest names: an error naming the file and the older tags
    import shutil
    shutil.rmtree(d / t6)
    f = d / t4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError) as e:
        resolve_resume(str(d), "latest")
    assert str(f) in str(e.value) and f"older tags: {t2}" in str(e.value)
    # an explicit older tag would overwrite the newer ones: only with overwrite, which removes them
    with pytest.raises(CheckpointError, match="would be overwritten"):
        resolve_resume(str(d), t2)
    assert resolve_resume(str(d), t2, overwrite=True) == (t2, [], [t4])
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(str(d), "step0000003")


def test_stale_shm_buffers_are_removed_only_when_no_process_holds_them(tmp_path):
    from loupe.train import SHM_PREFIX, remove_stale_shm_buffers
    uid = os.getuid()
    dead, held, young, other = (tmp_path / f"{SHM_PREFIX}{uid}_127.0.0.1_{port}_0" for port in (1, 2, 3, 4))
    other = tmp_path / f"{SHM_PREFIX}{uid + 1}_127.0.0.1_4_0"  # another user's
    for path in (dead, held, young, other):
        path.write_bytes(b"x" * 4096)
    old = time.time() - 3600
    for path in (dead, held, other):
        os.utime(path, (old, old))
    keeper = subprocess.Popen([sys.executable, "-c", "import mmap, sys, time; f = open(sys.argv[1], 'r+b'); "
                               "m = mmap.mmap(f.fileno(), 0); f.close(); print('mapped', flush=True); time.sleep(600)",
                               str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert keeper.stdout.readline().strip() == "mapped"
        assert remove_stale_shm_buffers(shm_dir=str(tmp_path)) == [str(dead)]
        assert held.exists() and young.exists() and other.exists() and not dead.exists()
    finally:
        keeper.kill()
        keeper.wait()
    assert remove_stale_shm_buffers(shm_dir=str(tmp_path)) == [str(held)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_second_run_on_the_same_output_refuses(tmp_path):
    out = tmp_path / "run"
    # long enough that the second launch (its start-up included) ends before the first, also on a
    # loaded machine (1500 steps were not, with twelve other runs on two cores)
    first = start(launch_cmd(out, steps=3000, extra=["--save-every", "1000"]))
    try:
        wait_for_step(first, out, 1)
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] != first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run(launch_cmd(out, steps=4), env=env(), capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second one started: make it longer"
        assert second.returncode != 0
        assert f"in use by another training run (pid {holder['pid']} on host {holder['host']}, started " \
               f"{holder['started']})" in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, stderr[-3000:]
    assert [r["step"] for r in read_log(out)] == list(range(1, 3001))  # nothing of the second run in it
    assert not (out / "log.jsonl.old").exists()
    assert loupe.load(str(out)) is not None
    assert (out / "checkpoints" / "latest").read_text() == "step0003000"
    assert (out / ".lock").read_text() == ""  # released


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints step0000002 and step0000004 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(launch_cmd(out, steps=4))
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["empty", "dangling", "killed_before_latest"])
def test_resume_latest_falls_back_to_the_newest_complete_tag(tmp_path, finished_run, case):
    out = _copy(finished_run, tmp_path / case)
    latest = out / "checkpoints" / "latest"
    latest.write_text({"empty": "", "dangling": "step0000099", "killed_before_latest": "step0000002"}[case])
    mtime = (out / "checkpoints" / "step0000002" / "mp_rank_00_model_states.pt").stat().st_mtime_ns
    p = run(launch_cmd(out, steps=6, extra=["--resume", "latest"]))
    assert "resuming from step0000004, the newest complete checkpoint" in p.stderr, p.stderr[-3000:]
    assert "resumed from step0000004 at step 4" in p.stdout
    assert [r["step"] for r in read_log(out)] == list(range(1, 7))
    assert latest.read_text() == "step0000006"
    # the older tag was not rewritten
    assert (out / "checkpoints" / "step0000002" / "mp_rank_00_model_states.pt").stat().st_mtime_ns == mtime
    if case == "empty":  # or a clear stop, with --resume-strict
        strict_out = _copy(finished_run, tmp_path / "strict")
        (strict_out / "checkpoints" / "latest").write_text("")
        strict = subprocess.run(launch_cmd(strict_out, steps=6, extra=["--resume", "latest", "--resume-strict"]),
                                env=env(), capture_output=True, text=True, timeout=300)
        assert strict.returncode != 0 and "--resume latest (strict)" in strict.stderr, strict.stderr[-3000:]
        assert "is empty" in strict.stderr and (strict_out / "checkpoints" / "latest").read_text() == ""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_of_a_truncated_checkpoint_names_the_file(tmp_path, finished_run):
    out = _copy(finished_run, tmp_path / "trunc")
    f = out / "checkpoints" / "step0000004" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    p = subprocess.run(launch_cmd(out, steps=6, extra=["--resume", "latest"]), env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0
    assert str(f) in p.stderr and "older tags: step0000002" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_fresh_run_refuses_a_directory_with_checkpoints_unless_overwrite(tmp_path, finished_run):
    out = _copy(finished_run, tmp_path / "again")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    p = subprocess.run(launch_cmd(out, steps=2), env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "already holds a run" in p.stderr and "--overwrite" in p.stderr, p.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != ".lock"} == \
        {k: v for k, v in before.items() if k.name != ".lock"}  # nothing touched
    run(launch_cmd(out, steps=2, extra=["--overwrite"]))
    assert sorted(os.listdir(out / "checkpoints" )) == ["latest", "step0000002", "zero_to_fp32.py", "zero_to_torch.py"]
    assert [r["step"] for r in read_log(out)] == [1, 2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_run_leaves_no_shm_buffer_and_its_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    cmd = launch_cmd(out, steps=400, extra=["--save-every", "2"])
    p = start(cmd)
    try:
        wait_for_step(p, out, 3)
        assert not shm_buffers(port_of(cmd))  # unlinked right after start-up, while the run goes on
        pid = json.loads((out / ".lock").read_text())["pid"]
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not shm_buffers(port_of(cmd))
    # a buffer left by a run killed before it could unlink it (e.g. an older loupe) goes at the next start
    stale = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{free_port()}_0"
    with open(stale, "wb") as f:
        f.write(b"x" * 4096)
    os.utime(stale, (time.time() - 3600,) * 2)
    try:
        again = run(launch_cmd(out, steps=4, extra=["--resume", "latest"]))
    finally:
        leaked = os.path.exists(stale)
        if leaked:
            os.unlink(stale)
    assert not leaked
    assert f"took over the stale lock {out / '.lock'} of pid {pid}" in again.stderr, again.stderr[-3000:]
    assert (out / ".lock").read_text() == ""


def training_processes(launcher_pid: int) -> list:
    """The ``loupe/train.py`` processes of a ``deepspeed`` launch (each has ``--local_rank``; the
    launcher ``deepspeed.launcher.launch`` names train.py too but is not one)."""
    import psutil
    found = []
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            argv = child.cmdline()
            if (any(a.startswith("--local_rank") for a in argv) and "deepspeed.launcher.launch" not in argv
                    and any(a.endswith("train.py") for a in argv)):
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_repeated_stop_signals_unwind_until_the_release_and_are_ignored_during_it():
    # the launcher relays a SIGTERM to its children, so a training process gets it again while it
    # unwinds; the handler used to leave the default action for the repeat, which killed the process
    # with its .lock still naming it (a CI failure under load)
    stop = train_mod._STOP
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for sig in previous:
            signal.signal(sig, train_mod._on_signal)
        stop.update(signal=None, releasing=False)
        for _ in range(2):  # the stop, then a relayed repeat: each unwinds
            with pytest.raises(SystemExit) as e:
                train_mod._on_signal(signal.SIGTERM, None)
            assert e.value.code == 128 + signal.SIGTERM
            assert signal.getsignal(signal.SIGTERM) is train_mod._on_signal  # not the default action
        assert stop["signal"] == signal.SIGTERM
        # a person's further Ctrl-C takes the default action: the process ends at once
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        stop["releasing"] = True
        assert train_mod._on_signal(signal.SIGTERM, None) is None  # ignored while main() releases
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.update(signal=None, releasing=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_releases_the_lock_and_the_shm_buffer(tmp_path):
    # SIGTERM to the launch's process group, then SIGTERM to the training processes every millisecond
    # until the run has ended (as the launcher relays it, but more often)
    import threading

    import psutil
    out = tmp_path / "run"
    cmd = launch_cmd(out, steps=2000, extra=["--save-every", "1000"])
    p = start(cmd)
    done = threading.Event()

    def repeat(trainers):
        while not done.is_set():
            for t in trainers:
                try:
                    t.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass
            time.sleep(0.001)

    try:
        wait_for_step(p, out, 1)
        assert json.loads((out / ".lock").read_text())["pid"]
        trainers = training_processes(p.pid)
        assert trainers
        os.killpg(p.pid, signal.SIGTERM)
        sender = threading.Thread(target=repeat, args=(trainers,), daemon=True)
        sender.start()
        _, err = p.communicate(timeout=120)  # reads the pipes while the signals go on
    finally:
        done.set()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode != 0
    assert (out / ".lock").read_text() == "", err[-3000:]  # released by the SIGTERM handler's unwinding
    assert not shm_buffers(port_of(cmd))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective, lr, seed", [
    ("loupe", "1e4", "0"),  # the command of issue 21: NaN tokens reach box_objectness at step 3
    ("filip", "1e30", "3"),  # NaN features reach token_region_similarity at step 2
])
def test_divergence_is_stopped_by_the_trainer_naming_the_step_and_checkpoint(tmp_path, objective, lr, seed):
    out = tmp_path / "run"
    cmd = launch_cmd(out, steps=6, objective=objective)
    cmd[cmd.index("--lr") + 1] = lr
    cmd[cmd.index("--seed") + 1] = seed
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "loupe: training diverged at step" in p.stderr, p.stderr[-3000:]
    # the checkpoint it names is the newest one saved (every 2 steps) before the step that diverged
    bad = int(re.search(r"diverged at step (\d+)", p.stderr).group(1))
    good = re.search(r"the last good checkpoint is step(\d+)", p.stderr)
    if good is None:
        assert "no checkpoint was saved" in p.stderr and bad <= 2, p.stderr[-3000:]
    else:
        assert int(good.group(1)) == 2 * ((bad - 1) // 2) > 0, p.stderr[-3000:]
        assert (out / "checkpoints" / f"step{int(good.group(1)):07d}").is_dir()
    assert "Traceback" not in p.stderr
    assert not shm_buffers(port_of(cmd))
