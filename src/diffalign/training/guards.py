"""Faults a training run handles itself, for every method (the one loop in loop.py calls them).

- SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C): finish the current optimizer step, save a checkpoint at
  that step boundary, exit with 128 + signal (143 / 130) and say how to resume. A second signal stops at once.
- Non-finite loss or gradient: that optimizer update is skipped (weights, optimizer, EMA and LR schedule are
  left as they were) with a warning and a counter; after `max_consecutive_nonfinite` in a row the run stops,
  naming the step and the last good checkpoint.
- Disk: before the first step, too little free space for one checkpoint stops the run (a full disk would
  otherwise fail hours later, in the middle of a write).

Every decision that changes control flow is agreed between processes (one small all-reduce per step), so
one rank's NaN or signal never leaves the others waiting in a collective.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..fsutil import check_free_space, human_bytes
from .checkpoint import estimate_checkpoint_bytes, list_checkpoints
from .run_log import log_step, write_train_report

if TYPE_CHECKING:
    from accelerate import Accelerator


class TrainingStopped(UserError):
    """The run stopped on purpose (a signal, or too many non-finite steps); `status` goes into train_report.json."""

    def __init__(self, message: str, status: str, exit_code: int = 2):
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code


class StopSignals:
    """While active, SIGTERM/SIGINT only set `received`; the loop acts on it at the next step boundary."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        # Python only lets the main thread install handlers; elsewhere (a notebook worker thread) keep the defaults.
        # A signal the caller ignores (a `cmd &` job of a non-interactive shell ignores SIGINT) stays ignored: the
        # user asked for that, and taking it over would make a second signal do nothing instead of stopping.
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: the user means now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping "
              "(send it again to stop at once, without a checkpoint)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()


def agree(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag true on any process -> true on all (no collective with one process)."""
    if getattr(accelerator, "num_processes", 1) == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(t, reduction="sum").tolist()]


@dataclass
class NonFinite:
    """Counters of skipped updates; saved in checkpoints so a resumed run keeps counting where it was."""

    limit: int
    total: int = 0  # updates skipped for a non-finite loss or gradient
    consecutive: int = 0
    fp16_overflow: int = 0  # GradScaler's own skips (finite loss, overflowing fp16 gradients): normal calibration
    first_bad_step: int | None = None  # first step of the current run of bad steps

    def state(self) -> dict:
        return {"nonfinite_steps": self.total, "consecutive_nonfinite": self.consecutive,
                "fp16_overflow_steps": self.fp16_overflow, "first_bad_step": self.first_bad_step}

    def restore(self, state: dict) -> None:
        self.total = int(state.get("nonfinite_steps", 0))
        self.consecutive = int(state.get("consecutive_nonfinite", 0))
        self.fp16_overflow = int(state.get("fp16_overflow_steps", 0))
        self.first_bad_step = state.get("first_bad_step")

    def record(self, step: int, skipped: str | None, sums: dict, log) -> None:
        """Count the outcome of update `step` (1-based, as in metrics.jsonl); raise when the limit is reached."""
        if skipped == "fp16_overflow":
            self.fp16_overflow += 1
        elif skipped:
            self.total += 1
            self.consecutive += 1
            if self.consecutive == 1:
                self.first_bad_step = step
            log(f"warning: step {step}: non-finite {skipped}, optimizer update skipped ({self.consecutive} in a row "
                f"of at most {self.limit}; {self.total} in this run)")
        else:
            self.consecutive, self.first_bad_step = 0, None
        sums["nonfinite_steps"] = self.total
        if skipped:
            sums["skipped_update"] = 1

    def exhausted(self) -> bool:
        return self.consecutive >= self.limit

    def stop_error(self, step: int, what: str, hint: str, last_checkpoint) -> TrainingStopped:
        where = (f"the last good checkpoint is {last_checkpoint} (resume with --resume_from_checkpoint=latest)"
                 if last_checkpoint else "no checkpoint was written yet")
        span = f"steps {self.first_bad_step}-{step}" if self.first_bad_step != step else f"step {step}"
        return TrainingStopped(
            f"the {what} loss or its gradients were not finite (NaN/inf) for {self.consecutive} optimizer steps in a "
            f"row ({span}; max_consecutive_nonfinite={self.limit}), so training stopped at step {step}; {hint}, or "
            f"train in full precision (mixed_precision=no); {where}", status="stopped: non-finite loss/gradients")


def grads_finite(params) -> bool:
    """This process's gradients (its shards, when sharded) are all finite."""
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def interrupted_error(signum: int, step: int, max_steps: int, checkpoint) -> TrainingStopped:
    name = signal.Signals(signum).name
    saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no step was taken, nothing to save"
    return TrainingStopped(
        f"stopped by {name} at step {step} of {max_steps}; {saved}. Resume with the same command plus "
        "--resume_from_checkpoint=latest (same output_dir)", status=f"interrupted: {name}", exit_code=128 + signum)


def check_disk_for_checkpoints(out, params, *, ema: bool, cfg, log) -> int:
    """Before the first step: refuse when one checkpoint does not fit; warn when all planned ones may not."""
    one = estimate_checkpoint_bytes(params, state_bytes=1 if cfg.use_8bit_adam else 4, ema=ema)
    free = check_free_space(out, one, "one training checkpoint",
                            "the estimate counts the trainable weights twice (the resume copy and the loadable "
                            "one), two AdamW states per weight"
                            + (" and an EMA copy" if ema else ""))
    planned = max(cfg.max_train_steps - 1, 0) // cfg.checkpointing_steps + 1  # + the one at the last step
    kept = min(planned, cfg.checkpoints_total_limit or planned)
    if kept > 1 and free < one * kept:
        log(f"warning: {kept} checkpoints of ~{human_bytes(one)} each may not fit in the {human_bytes(free)} free "
            f"in {out}; set checkpoints_total_limit to keep fewer")
    return one


class StepBoundary:
    """What the loop does after each optimizer update: count a skipped update, log the step, checkpoint, and
    stop when asked to (a signal) or when too many updates in a row were not finite.

    `save(step)` writes checkpoint `step` (called on the main process only) and returns its folder;
    `report(status)` returns the train_report.json dict for a run ending with `status`.
    """

    def __init__(self, cfg, *, out, accelerator: Accelerator, main: bool, log, what: str, hint: str, save, report,
                 collective_save: bool = False):
        self.cfg, self.out, self.accelerator, self.main, self.log = cfg, out, accelerator, main, log
        self.writes = main or collective_save  # sharded: every process takes part in a checkpoint
        self.what, self.hint, self.save, self.report = what, hint, save, report
        self.nonfinite = NonFinite(cfg.max_consecutive_nonfinite)
        self.signals = StopSignals()

    def checkpoint_extra(self, **more) -> dict:
        return {"method": self.cfg.method, **self.nonfinite.state(), **more}

    def end_step(self, step: int, skipped: str | None, stop: bool, sums: dict, bar) -> None:
        cfg = self.cfg
        self.nonfinite.record(step, skipped, sums, self.log if self.main else (lambda msg: None))
        log_step(self.accelerator, self.out, self.main, step, sums, bar)
        saved = None
        # No checkpoint after a skipped update: the newest checkpoint stays one taken before a bad stretch.
        # The last step always gets one: a finished run's newest checkpoint is its final weights.
        if self.writes and not skipped and (step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps):
            saved = self.save(step)
        error = None
        if self.nonfinite.exhausted():
            found = list_checkpoints(self.out)
            error = self.nonfinite.stop_error(step, self.what, self.hint, found[-1] if found else None)
        elif stop and step < cfg.max_train_steps:  # at the last step the run is about to finish anyway
            if self.writes and saved is None:
                saved = self.save(step)
            error = interrupted_error(self.signals.received or signal.SIGTERM, step, cfg.max_train_steps,
                                      saved or self.out / f"checkpoint-{step}")
        self.stop_with(error)

    def stop_with(self, error: "TrainingStopped | None") -> None:
        """Write the report with the error's status and raise it (every process decides alike); None: go on."""
        if error is not None:
            if self.main:
                try:
                    write_train_report(self.out, self.report(error.status))
                except OSError:  # the disk may still be full: the error itself matters more
                    pass
            self.accelerator.wait_for_everyone()
            raise error
