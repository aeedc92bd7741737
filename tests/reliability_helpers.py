"""Shared by the test_reliability_* files: run `diffalign train` as a subprocess and kill it at chosen moments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds one attempt may take on a busy 2-core machine


def env(**extra) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    e.pop("DIFFALIGN_TEST_CHECKPOINT_PAUSE", None)
    e.update(extra)
    return e


def start(args: list[str], log: Path, **env_extra) -> subprocess.Popen:
    fh = open(log, "w")
    # The run gets SIGINT as a terminal's foreground job has it, even when pytest itself was started as a
    # background job (which inherits SIGINT ignored, and diffalign leaves an ignored signal ignored).
    return subprocess.Popen([sys.executable, "-m", "diffalign", "train", *args], cwd=REPO, env=env(**env_extra),
                            stdout=fh, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def metric_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:
                pass  # a torn line of a killed run
    return steps


def wait_until(cond, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> bool:
    """Poll `cond` until true (-> True) or the process exits first (-> False)."""
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    return True


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a training subprocess did not finish in time")


def kill_after_progress(args, out: Path, log: Path, rng, sig=signal.SIGKILL, max_delay: float = 0.6) -> int:
    """Start (resuming), wait until it logs a step it never reached before, wait a random moment, send `sig`."""
    before = max(metric_steps(out), default=0)
    proc = start(args, log)
    if wait_until(lambda: max(metric_steps(out), default=0) > before, proc, "a new training step"):
        time.sleep(rng.uniform(0, max_delay))
        proc.send_signal(sig)
    return finish(proc)


def kill_inside_checkpoint_write(args, out: Path, log: Path, step: int) -> int:
    """Pause the writer of checkpoint `step` after its first file (test hook) and SIGKILL it there."""
    proc = start(args, log, DIFFALIGN_TEST_CHECKPOINT_PAUSE=f"{step}:{TIMEOUT}")
    first_file = out / f".checkpoint-{step}.tmp" / "trainable.safetensors"
    assert wait_until(first_file.is_file, proc, f"the write of checkpoint-{step}"), log.read_text()[-2000:]
    time.sleep(0.1)
    proc.kill()
    return finish(proc)


def assert_same_tensors(a_path: Path, b_path: Path) -> None:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
