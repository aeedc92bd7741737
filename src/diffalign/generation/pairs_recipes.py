"""The three recipes of `diffalign pairs`: what is sampled, and which images of a unit become pairs.

A run is a list of *units* numbered 0..n-1, each decided by its number alone (never by batch size, shard or
resume): prefix: one pair slot; ranked: one group of candidates; target: one usable row of the source. A recipe
says which images to sample (`jobs`: `generate_to_folder` calls whose image index maps to units), what a unit
holds (`unit`: its caption and sides, the prompts each side is scored against) and which sides of a unit
become pairs given their scores (`decide`: (slot, winner, loser) triples plus counts of what was skipped).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ..errors import UserError
from .pairs_config import PairsConfig, apply_template

STRATEGIES = ("best-worst", "all")
REJECTED_SEED_OFFSET = 1_000_000  # prefix with same_seed: false


@dataclass(frozen=True)
class Side:
    """One image of a unit: a sampled file (its prompt and seed known) or a real image of the source."""

    prompt: str | None
    seed: int | None
    file: Path | None = None
    source_row: int | None = None


@dataclass
class Unit:
    index: int
    caption: str
    sides: list[Side]
    score_prompts: list[str]


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


# -------------------------------------------------------------------------------------------- recipes
class Recipe:
    """Base: units over a prompt list, prompt i mod len(prompts) for unit i (the prompts take turns)."""

    name = ""
    slots_per_unit = 1

    def __init__(self, cfg: PairsConfig, prompts: list[str] | None = None, source=None, rows: list[int] | None = None):
        self.cfg, self.prompts, self.source, self.rows = cfg, prompts, source, rows
        self.num_units = self._count()

    def _count(self) -> int:
        return self.cfg.num_pairs or len(self.prompts) * self.cfg.pairs_per_prompt

    def prompt(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]

    def jobs(self) -> list[Job]:
        raise NotImplementedError

    def unit(self, i: int, images: dict[str, dict[int, object]], root: Path = Path()) -> Unit:
        """Unit i; `images[job.folder][index]` is the `GeneratedImage` of each job's image, under root/job.folder."""
        raise NotImplementedError

    def decide(self, scores) -> tuple[list[tuple[int, int, int]], Counter]:
        return decide_two(scores, self.cfg.margin)

    @staticmethod
    def _side(image, folder: Path) -> Side:
        return Side(image.prompt, image.seed, folder / image.file)


class PrefixRecipe(Recipe):
    """MaPO Pick-Style / Pick-Safety: chosen from chosen_template, rejected from rejected_template."""

    name = "prefix"

    def jobs(self) -> list[Job]:
        c = self.cfg
        units = range(self.num_units)
        rejected_seed = c.seed if c.same_seed else c.seed + REJECTED_SEED_OFFSET
        return [Job("chosen", [apply_template(c.chosen_template, self.prompt(i)) for i in units], 1, c.seed),
                Job("rejected", [apply_template(c.rejected_template, self.prompt(i)) for i in units], 1, rejected_seed)]

    def unit(self, i, images, root: Path = Path()) -> Unit:
        chosen = self._side(images["chosen"][i], root / "chosen")
        rejected = self._side(images["rejected"][i], root / "rejected")
        # Both scored against the chosen prompt: does the chosen image show what it asks for, more?
        return Unit(i, self.prompt(i), [chosen, rejected], [chosen.prompt, chosen.prompt])


class RankedRecipe(Recipe):
    """AI feedback: num_samples_per_prompt candidates per group, ranked by the reward."""

    name = "ranked"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = self.cfg.num_samples_per_prompt
        self.slots_per_unit = 1 if self.cfg.strategy == "best-worst" else n * (n - 1) // 2

    def jobs(self) -> list[Job]:
        c = self.cfg
        return [Job("candidates", [self.prompt(g) for g in range(self.num_units)], c.num_samples_per_prompt, c.seed)]

    def unit(self, g, images, root: Path = Path()) -> Unit:
        n = self.cfg.num_samples_per_prompt
        sides = [self._side(images["candidates"][g * n + j], root / "candidates") for j in range(n)]
        return Unit(g, self.prompt(g), sides, [self.prompt(g)] * n)

    def decide(self, scores):
        return pick_pairs(scores, self.cfg.strategy, self.cfg.margin)


class TargetRecipe(Recipe):
    """MaPO's "any fine-tuning set becomes pairs": the real image wins over the model's sample of its caption."""

    name = "target"

    def _count(self) -> int:
        return len(self.rows)

    def prompt(self, i: int) -> str:
        return self.source.caption(self.rows[i])

    def jobs(self) -> list[Job]:
        return [Job("rejected", [self.prompt(i) for i in range(self.num_units)], 1, self.cfg.seed)]

    def unit(self, i, images, root: Path = Path()) -> Unit:
        caption = self.prompt(i)
        real = Side(None, None, source_row=self.rows[i])
        return Unit(i, caption, [real, self._side(images["rejected"][i], root / "rejected")], [caption, caption])


RECIPES = {r.name: r for r in (PrefixRecipe, RankedRecipe, TargetRecipe)}


def build_recipe(cfg: PairsConfig) -> Recipe:
    """The recipe of a validated config with its prompts read (or its source opened and checked)."""
    if cfg.recipe == "target":
        from .pairs_sources import open_source, usable_rows

        source = open_source(cfg.image_caption_source, image_column=cfg.image_column, caption_column=cfg.caption_column,
                             split=cfg.source_split, strict=cfg.strict_data)
        return TargetRecipe(cfg, source=source, rows=usable_rows(source, cfg.num_pairs))
    from .pairs_config import resolve_prompts

    return RECIPES[cfg.recipe](cfg, prompts=resolve_prompts(cfg))
