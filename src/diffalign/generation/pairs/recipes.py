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

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...data.captions import open_captions, usable_rows
from .config import PairsConfig, apply_template, resolve_prompts
from .units import Job, Side, Unit, decide_two, pick_pairs, try_folder

REJECTED_SEED_OFFSET = 1_000_000  # prefix with same_seed: false
TRY_SEED_STRIDE = 10_000_000  # try t adds t x this to every seed of a unit (max_tries)


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
        source = open_captions(cfg.image_caption_source, image_column=cfg.image_column, caption_column=cfg.caption_column,
                               split=cfg.source_split, strict=cfg.strict_data, image_root=cfg.image_root)
        return TargetRecipe(cfg, source=source, rows=usable_rows(source, cfg.num_pairs))

    return RECIPES[cfg.recipe](cfg, prompts=resolve_prompts(cfg))
