"""A unit of `diffalign pairs`: the images one pair (or one group of candidates) is decided from, the jobs that
sample them, and the rules that pick the pair (`pick_pairs` for a ranked group, `decide_two` for chosen against
rejected)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ...errors import UserError

STRATEGIES = ("best-worst", "all")


@dataclass(frozen=True)
class Side:
    """One image of a unit: a sampled file (its prompt and seed known) or a real image of the source."""

    prompt: str | None
    seed: int | None
    file: Path | None = None
    source_row: int | None = None


@dataclass
class Unit:
    """A unit's images (one try of them) and the prompts its sides are scored against: `score_prompts` by the
    `reward` check, `filter_prompts` by the filter (prefix: the chosen prompt, then the context prompt)."""

    index: int
    caption: str
    sides: list[Side]
    score_prompts: list[str]
    filter_prompts: list[str] | None = None
    attempt: int = 0  # the try these images come from


def try_folder(folder: str, attempt: int) -> str:
    """The images folder of a job's try: the job's own for try 0, `<job>_try<t>` after it."""
    return folder if attempt == 0 else f"{folder}_try{attempt}"


@dataclass(frozen=True)
class Job:
    """One `generate_to_folder` call: image k*per_prompt + j samples prompts[k] with seed + k*per_prompt + j."""

    folder: str
    prompts: list[str]
    per_prompt: int
    seed: int


# ------------------------------------------------------------------------------------------- deciding
def pick_pairs(scores, strategy: str = "best-worst", margin: float = 0.0) -> tuple[list[tuple[int, int, int]], Counter]:
    """(slot, winner, loser) positions among one group's `scores`, and what was skipped, by reason.

    best-worst: the first highest against the first lowest (slot 0). all: every two candidates, slot c the
    c-th pair of `itertools.combinations`. A pair is kept only when the winner's score exceeds the loser's by
    more than `margin` (equal scores never win); NaN scores take no part (`unscored`).
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown pair strategy '{strategy}': use one of {', '.join(STRATEGIES)}")
    scores = [float(s) for s in scores]
    skipped: Counter = Counter()
    if strategy == "best-worst":
        ok = [i for i, s in enumerate(scores) if not math.isnan(s)]
        if len(ok) < 2:
            skipped["unscored"] += 1
            return [], skipped
        looked = [(0, max(ok, key=scores.__getitem__), min(ok, key=scores.__getitem__))]
    else:
        looked = []
        for slot, (i, j) in enumerate(combinations(range(len(scores)), 2)):
            if math.isnan(scores[i]) or math.isnan(scores[j]):
                skipped["unscored"] += 1
            else:
                looked.append((slot, i, j) if scores[i] >= scores[j] else (slot, j, i))
    kept = [(slot, w, l) for slot, w, l in looked if scores[w] - scores[l] > margin]
    if len(kept) < len(looked):
        skipped["gap_below_margin"] += len(looked) - len(kept)
    return kept, skipped


def decide_two(scores, margin: float) -> tuple[list[tuple[int, int, int]], Counter]:
    """Side 0 (chosen) against side 1 (rejected); with scores, kept only if the chosen wins by more than margin."""
    if scores is None:
        return [(0, 0, 1)], Counter()
    gap = float(scores[0]) - float(scores[1])
    if math.isnan(gap):
        return [], Counter(unscored=1)
    if gap > margin:
        return [(0, 0, 1)], Counter()
    return [], Counter({"reversed" if gap < -margin else "gap_below_margin": 1})


__all__ = ["Job", "STRATEGIES", "Side", "Unit", "decide_two", "pick_pairs", "try_folder"]
