"""What an evaluation produced: the images it scored (`ImageRecord`) and `EvaluationResult`, the scores and
metrics that `evaluate.py` computes and `report.py` / `overview.py` write out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .distribution import DistributionDifference, DistributionMetrics
from .stats import Interval, WinRate


@dataclass(frozen=True)
class ImageRecord:
    """One image of a generated folder, as its manifest row names it."""

    label: str
    folder: str
    file: str
    prompt: str
    seed: int | None
    index: int | None

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.file

    @property
    def key(self) -> tuple:
        """What pairs images across folders: the same prompt and the same seed."""
        return (self.prompt, self.seed)


@dataclass
class EvaluationResult:
    """Scores and metrics of one evaluation; `scores[i, r]` is reward `rewards[r]` of `records[i]`."""

    folders: dict[str, str]
    rewards: list[str]
    reward_specs: dict[str, str]
    records: list[ImageRecord]
    scores: np.ndarray
    baselines: list[str]
    # (label, baseline) pairs compared besides every folder against each baseline (`evaluate_folders(compare=)`)
    extra_comparisons: list[tuple[str, str]] = field(default_factory=list)
    means: dict[str, dict[str, Interval]] = field(default_factory=dict)
    win_rates: dict[str, dict[tuple[str, str], WinRate]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    bootstrap: int = 2000
    seed: int = 0
    level: float = 0.95
    report_path: Path | None = None
    # Set-level measures (only with `distribution`): the measure's settings, per label, per (label, baseline).
    distribution_settings: dict | None = None
    distribution: dict[str, DistributionMetrics] = field(default_factory=dict)
    distribution_differences: dict[tuple[str, str], DistributionDifference] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.folders)

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        """Every (label, baseline) pair that gets win rates and distribution differences: each folder that is not
        a baseline against each baseline, then the extra pairs not already among them."""
        pairs = [(label, baseline) for baseline in self.baselines for label in self.labels
                 if label not in self.baselines]
        return pairs + [pair for pair in self.extra_comparisons if pair not in pairs]

    def rows_of(self, label: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if r.label == label]

    def scores_of(self, label: str, reward: str) -> np.ndarray:
        return self.scores[self.rows_of(label), self.rewards.index(reward)]

    def to_json(self) -> dict:
        out = {
            "folders": {label: {"path": path, "images": len(self.rows_of(label)),
                                "skipped": sum(s["label"] == label for s in self.skipped)}
                        for label, path in self.folders.items()},
            "rewards": dict(self.reward_specs),
            "baselines": list(self.baselines),
            "comparisons": [list(pair) for pair in self.comparisons],
            "bootstrap": {"samples": self.bootstrap, "seed": self.seed, "level": self.level, "method": "percentile"},
            "means": {reward: {label: iv.as_dict() for label, iv in per.items()} for reward, per in self.means.items()},
            "win_rates": {reward: [{"label": a, "baseline": b, **wr.as_dict()} for (a, b), wr in per.items()]
                          for reward, per in self.win_rates.items()},
            "skipped": list(self.skipped),
        }
        if self.distribution_settings is not None:
            out["distribution"] = {
                **self.distribution_settings,
                "sets": {label: m.as_dict() for label, m in self.distribution.items()},
                "differences": [{"label": a, "baseline": b, **d.as_dict()}
                                for (a, b), d in self.distribution_differences.items()],
            }
        return out


__all__ = ["EvaluationResult", "ImageRecord"]
