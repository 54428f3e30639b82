"""Deterministic continuation: a run killed with SIGKILL (also at random times, possibly while it writes a
checkpoint) and resumed logs bitwise the same per-step losses as an uninterrupted run (CPU)."""
import os
import random
import signal
import subprocess
import sys
import time

from foldforge.train import checkpoint as ckpt
from foldforge.train.metrics import read_metrics

STEPS = 14   # > 12 draws per epoch (12 training chains, batch 1): the data position crosses an epoch
TRAIN = ("import sys, torch; torch.use_deterministic_algorithms(True); "
         "from foldforge.cli import main; sys.exit(main(sys.argv[1:]))")


def _cmd(cache, run, resume=False):
    return [sys.executable, "-c", TRAIN, "train", "--data", str(cache), "--out", str(run), "--max-steps",
            str(STEPS), "--no-progress", *(["--resume"] if resume else []),
            "--set", "train.val_fraction=0", "train.checkpoint_every=1", "train.keep_checkpoints=3",
            "train.num_workers=0"]


def _env():
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _newest_step(run) -> int:
    found = ckpt.list_checkpoints(run)
    return found[-1][0] if found else 0


def _start_and_kill(cmd, run, after_step: int, extra_delay: float) -> bool:
    """Start ``cmd``, wait for a checkpoint newer than ``after_step``, then SIGKILL it after
    ``extra_delay`` s. Returns False if the process finished on its own first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while _newest_step(run) <= after_step:
            if proc.poll() is not None:
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
                return False
            time.sleep(0.005)
        time.sleep(extra_delay)
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _losses(run) -> dict[int, float]:
    rows = read_metrics(run, "train")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    return {r["step"]: r["loss"] for r in rows}


def test_sigkill_and_resume_continue_exactly(sample_cache, tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    done = subprocess.run(_cmd(sample_cache, run_a), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    # B: killed after its 2nd checkpoint, then killed at random moments of later attempts
    rng = random.Random(0)
    assert _start_and_kill(_cmd(sample_cache, run_b), run_b, after_step=1, extra_delay=0.0)
    kills = 1
    for _ in range(3):
        newest = _newest_step(run_b)
        # the newest checkpoint always loads directly: no partial file ever carries a final name
        assert newest >= 2 and ckpt.load_checkpoint(ckpt.checkpoint_path(run_b, newest))["step"] == newest
        if not _start_and_kill(_cmd(sample_cache, run_b, resume=True), run_b, newest, rng.uniform(0.0, 0.4)):
            break
        kills += 1
    assert kills >= 2
    done = subprocess.run(_cmd(sample_cache, run_b, resume=True), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    assert not list((run_b / "checkpoints").glob(".*.tmp*"))

    a, b = _losses(run_a), _losses(run_b)
    assert a == b    # bitwise: the same floats, step by step
    assert len(set(a.values())) == STEPS
