"""The run's records in its output folder: metrics.jsonl (one line a step), train_report.json (its status) and
config.yaml, written by the main process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..config_loader import dump_config
from ..fsutil import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator


def log_step(accelerator: Accelerator, out: Path, main: bool, step: int, sums: dict, bar) -> None:
    """Trackers, plus metrics.jsonl in the run folder whatever tracker is configured, and the progress bar."""
    accelerator.log(sums, step=step)
    if main:
        with (out / "metrics.jsonl").open("a") as f:
            # NaN/inf are not JSON: a skipped step logs null for them.
            values = {k: round(v, 6) if math.isfinite(v) else None for k, v in sums.items()}
            f.write(json.dumps({"step": step, **values}) + "\n")
    bar.update(1)
    bar.set_postfix(loss=f"{sums.get('loss', float('nan')):.4g}")


def trim_metrics(out: Path, step: int) -> None:
    """Keep only whole metrics.jsonl lines of steps <= `step` (the step a run starts or resumes at): a killed run
    may have logged steps after its last checkpoint, or half a line; those steps are about to be redone."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # the torn last line of a killed run
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def write_train_report(out: Path, report: dict) -> None:
    atomic_write_text(Path(out) / "train_report.json", json.dumps(report, indent=2))


def open_run_log(cfg, out: Path, accelerator: Accelerator, step: int, running_report: dict) -> None:
    """Main process, once a run has started or resumed at `step`: drop metrics a killed run logged after its last
    checkpoint (those steps are redone), mark the report running ("finished" only once every output is
    written), write the resolved config and start the trackers."""
    trim_metrics(out, step)
    write_train_report(out, running_report)
    dump_config(cfg, out / "config.yaml")
    accelerator.init_trackers(cfg.tracker_project_name, config={k: v for k, v in vars(cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})


def run_finished(out: Path, step: int) -> bool:
    """True when out/train_report.json says the run finished at `step` (its outputs were all written then)."""
    try:
        report = json.loads((Path(out) / "train_report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("status") == "finished" and report.get("steps") == step
