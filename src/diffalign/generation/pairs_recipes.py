"""The three recipes of `diffalign pairs`: what is sampled, and which images of a unit become pairs.

A run is a list of *units* numbered 0..n-1, each decided by its number alone (never by batch size, shard or
resume): prefix: one pair slot; ranked: one group of candidates; target: one usable row of the source. A recipe
says which images to sample (`jobs`: `generate_to_folder` calls whose image index maps to units), what a unit
holds (`unit`: its caption and sides, the prompts each side is scored against) and which sides of a unit
become pairs given their scores (`decide`: (slot, winner, loser) triples plus counts of what was skipped).

Further tries (`max_tries`, prefix and target): try t >= 1 of unit i samples the images of every job again, with
the same prompt and seed + t x TRY_SEED_STRIDE + i (`retry_items`), into the job's folder `<job>_try<t>`; try 0
is the job itself. So every image of a run is still a function of its unit, its try and the config.
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
TRY_SEED_STRIDE = 10_000_000  # try t adds t x this to every seed of a unit (max_tries)


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


# -------------------------------------------------------------------------------------------- recipes
class Recipe:
    """Base: units over a prompt list, prompt i mod len(prompts) for unit i (the prompts take turns)."""

    name = ""
    slots_per_unit = 1
    chosen_resampled = True  # False: the chosen image is the same in every try (a real image)

    def __init__(self, cfg: PairsConfig, prompts: list[str] | None = None, source=None, rows: list[int] | None = None):
        self.cfg, self.prompts, self.source, self.rows = cfg, prompts, source, rows
        self.num_units = self._count()
        self._jobs: list[Job] | None = None

    def _count(self) -> int:
        return self.cfg.num_pairs or len(self.prompts) * self.cfg.pairs_per_prompt

    def prompt(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]

    def jobs(self) -> list[Job]:
        raise NotImplementedError

    def unit(self, i: int, images: dict[str, dict[int, object]], root: Path = Path(), attempt: int = 0) -> Unit:
        """Unit i (its images of try `attempt`); `images[folder][index]` is the `GeneratedImage` of each job's
        image, under root/folder, where folder is `try_folder(job.folder, attempt)`."""
        raise NotImplementedError

    def cached_jobs(self) -> list[Job]:
        """`jobs()`, made once."""
        if self._jobs is None:
            self._jobs = self.jobs()
        return self._jobs

    def retry_items(self, attempt: int) -> dict[str, "RetryItems"]:
        """{try folder: the (prompt, seed) of each unit's image} of try `attempt` >= 1, one entry per job."""
        return {try_folder(job.folder, attempt): RetryItems(job.prompts, job.seed + attempt * TRY_SEED_STRIDE)
                for job in self.cached_jobs()}

    def decide(self, scores) -> tuple[list[tuple[int, int, int]], Counter]:
        return decide_two(scores, self.cfg.margin)

    @staticmethod
    def _side(image, folder: Path) -> Side:
        return Side(image.prompt, image.seed, folder / image.file)


@dataclass(frozen=True)
class RetryItems:
    """The images of one job in one further try: unit i is prompts[i] with seed base_seed + i."""

    prompts: list[str]
    base_seed: int

    def __call__(self, i: int) -> tuple[str, int] | None:
        """(prompt, seed) of unit i; None beyond the run's units."""
        return (self.prompts[i], self.base_seed + i) if 0 <= i < len(self.prompts) else None


class PrefixRecipe(Recipe):
    """MaPO Pick-Style / Pick-Safety: chosen from chosen_template, rejected from rejected_template."""

    name = "prefix"

    def jobs(self) -> list[Job]:
        c = self.cfg
        units = range(self.num_units)
        rejected_seed = c.seed if c.same_seed else c.seed + REJECTED_SEED_OFFSET
        return [Job("chosen", [apply_template(c.chosen_template, self.prompt(i)) for i in units], 1, c.seed),
                Job("rejected", [apply_template(c.rejected_template, self.prompt(i)) for i in units], 1, rejected_seed)]

    def unit(self, i, images, root: Path = Path(), attempt: int = 0) -> Unit:
        c, r = try_folder("chosen", attempt), try_folder("rejected", attempt)
        chosen, rejected = self._side(images[c][i], root / c), self._side(images[r][i], root / r)
        # The reward check scores both against the chosen prompt: does the chosen image show what it asks for,
        # more? The filter scores each image for itself: the chosen against its prompt, the rejected against
        # the context prompt (its content, whatever the rejected template adds).
        return Unit(i, self.prompt(i), [chosen, rejected], [chosen.prompt, chosen.prompt],
                    [chosen.prompt, self.prompt(i)], attempt)


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

    def unit(self, g, images, root: Path = Path(), attempt: int = 0) -> Unit:
        n = self.cfg.num_samples_per_prompt
        sides = [self._side(images["candidates"][g * n + j], root / "candidates") for j in range(n)]
        return Unit(g, self.prompt(g), sides, [self.prompt(g)] * n)

    def decide(self, scores):
        return pick_pairs(scores, self.cfg.strategy, self.cfg.margin)


class TargetRecipe(Recipe):
    """MaPO's "any fine-tuning set becomes pairs": the real image wins over the model's sample of its caption."""

    name = "target"
    chosen_resampled = False

    def _count(self) -> int:
        return len(self.rows)

    def prompt(self, i: int) -> str:
        return self.source.caption(self.rows[i])

    def jobs(self) -> list[Job]:
        return [Job("rejected", [self.prompt(i) for i in range(self.num_units)], 1, self.cfg.seed)]

    def unit(self, i, images, root: Path = Path(), attempt: int = 0) -> Unit:
        caption, r = self.prompt(i), try_folder("rejected", attempt)
        real = Side(None, None, source_row=self.rows[i])
        return Unit(i, caption, [real, self._side(images[r][i], root / r)], [caption, caption], [caption, caption], attempt)


RECIPES = {r.name: r for r in (PrefixRecipe, RankedRecipe, TargetRecipe)}


def build_recipe(cfg: PairsConfig) -> Recipe:
    """The recipe of a validated config with its prompts read (or its source opened and checked)."""
    if cfg.recipe == "target":
        from ..data.captions import open_captions, usable_rows

        source = open_captions(cfg.image_caption_source, image_column=cfg.image_column, caption_column=cfg.caption_column,
                             split=cfg.source_split, strict=cfg.strict_data)
        return TargetRecipe(cfg, source=source, rows=usable_rows(source, cfg.num_pairs))
    from .pairs_config import resolve_prompts

    return RECIPES[cfg.recipe](cfg, prompts=resolve_prompts(cfg))
