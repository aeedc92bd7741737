"""Images that fail when they are fetched count against the same "no usable data" rule as rows that fail
validation up front (issue 22, defect 1).

A row whose image bytes cannot be decoded (or are below `min_image_size`) is only found when the BatchStream
fetches it; the micro-batch is then trained without it, or skipped when none of its rows is usable. Counting
those failures per process is not enough: a run whose every image is broken used to "finish" with zero LoRA
weights. Here each process adds its failures of a micro-batch to the step's metric sums (`skipped_at_fetch`),
which the loop already reduces over all processes once per step, so every process sees the same global count
and takes the same decision:

- the failures of the current epoch reach `max_skipped_share` of the epoch's rows -> stop;
- the run reaches its last step having fetched less than an epoch and the failures reach that share of the rows
  it fetched -> stop instead of writing "finished".

The counters travel in checkpoints, so a resumed run keeps counting where it was.
"""

from __future__ import annotations

import torch

from .guards import TrainingStopped

METRIC = "skipped_at_fetch"


def add_fetch_failures(sums: dict, items: list, world: int) -> None:
    """Add this process's failed rows of a micro-batch (`None` items) to the step's sums, as a tensor so the
    step's reduction (`sums_to_host`) runs even when every micro-batch of the step was skipped."""
    bad = sum(1 for it in items if it is None)
    sums[METRIC] = sums.get(METRIC, 0.0) + torch.tensor(float(bad * world), dtype=torch.float64)


class FetchFailures:
    """Global (all processes) counts of rows fetched and rows whose images failed, per epoch and in all."""

    def __init__(self, limit: float, rows_per_micro: int, micro_per_epoch: int, ga: int, describe):
        self.limit, self.rows_per_micro, self.micro_per_epoch, self.ga = limit, rows_per_micro, micro_per_epoch, ga
        self.describe = describe  # () -> the data summary, for the message
        self.fetched = self.failed = 0
        self.epoch, self.epoch_fetched, self.epoch_failed = 0, 0, 0

    @property
    def epoch_rows(self) -> int:
        return self.micro_per_epoch * self.rows_per_micro

    def state(self) -> dict:
        return {"fetched_rows": self.fetched, "fetch_failures": self.failed,
                "fetch_epoch": [self.epoch, self.epoch_fetched, self.epoch_failed]}

    def restore(self, state: dict) -> None:
        self.fetched = int(state.get("fetched_rows", 0))
        self.failed = int(state.get("fetch_failures", 0))
        self.epoch, self.epoch_fetched, self.epoch_failed = (int(v) for v in state.get("fetch_epoch", (0, 0, 0)))

    def record(self, step: int, sums: dict) -> None:
        """Count step `step` (0-based, before the loop increments it); `sums` are reduced over processes."""
        epoch = (step * self.ga) // self.micro_per_epoch
        if epoch != self.epoch:
            self.epoch, self.epoch_fetched, self.epoch_failed = epoch, 0, 0
        failed = int(round(float(sums.get(METRIC, 0.0))))
        rows = self.ga * self.rows_per_micro
        self.fetched += rows
        self.failed += failed
        self.epoch_fetched += rows
        self.epoch_failed += failed

    def _error(self, step: int, failed: int, of: int, what: str) -> TrainingStopped:
        return TrainingStopped(
            f"{failed} of the {of} rows fetched {what} had images that could not be used (undecodable, too "
            f"small or too large), at least max_skipped_share={self.limit:g} of them, so training stopped at step "
            f"{step} instead of learning from almost nothing ({self.describe()}); fix the images, or raise "
            "max_skipped_share to accept more skipped rows", status="stopped: no usable data")

    def check(self, step: int, last: bool) -> TrainingStopped | None:
        """The error to stop with after step `step` (1-based), or None."""
        if self.epoch_failed and self.epoch_failed >= self.limit * self.epoch_rows:
            return self._error(step, self.epoch_failed, self.epoch_rows, f"in epoch {self.epoch + 1}")
        if last and self.failed and self.fetched < self.epoch_rows and self.failed >= self.limit * self.fetched:
            return self._error(step, self.failed, self.fetched, "in this run")
        return None
