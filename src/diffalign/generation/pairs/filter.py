"""The image filter of `diffalign pairs` (recipes prefix and target) and the rule that decides a try.

A filter is a reward (`filter_reward`, any spec `get_reward` takes) and conditions `TERM OP NUMBER` on its terms
(OP: >=, >, <=, <; TERM: `score`, the reward's own score, or a term of its `details`):

- `filter_chosen` on the chosen image, scored against the prompt it was sampled from (prefix: the chosen
  template; target: the caption);
- `filter_rejected` on the rejected image, scored against the context prompt (prefix; target: the caption), so
  it checks the content both images should share, not what the rejected template adds.

A NaN value (a term the prompt does not ask about) meets no condition. Toy Pick-Style with content kept:
`filter_chosen: ['all_correct >= 1']` (the chosen image draws the shape, colour and style its prompt names) and
`filter_rejected: ['all_correct >= 1', 'style_striped < 0.5']` (the rejected one the shape and colour, unstriped).

A try of a unit passes when it meets every check, in this order: the chosen conditions, the rejected conditions,
then the `reward` / `margin` check (`decide_two`). `judge_try` names every check a failed try failed; a unit that
never passes is counted once, by the first reason of its last try.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from dataclasses import dataclass

from ...errors import UserError
from .units import Unit, decide_two

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|>|<)\s*(\S+)\s*$")
CHOSEN_FAILED, REJECTED_FAILED = "chosen_failed", "rejected_failed"


@dataclass(frozen=True)
class Condition:
    """`term op value`, e.g. all_correct >= 1. NaN meets no condition (every comparison with NaN is false)."""

    term: str
    op: str
    value: float

    def holds(self, x: float) -> bool:
        return bool(OPS[self.op](float(x), self.value))

    def __str__(self) -> str:
        return f"{self.term} {self.op} {self.value:g}"


def parse_condition(text: str, key: str) -> Condition:
    """One condition of config key `key`; UserError naming the key and the expected form."""
    match = _CONDITION.match(str(text))
    value = None
    if match:
        try:
            value = float(match.group(3))
        except ValueError:
            pass
    if value is None or not math.isfinite(value):
        raise UserError(f"{key}: {text!r} is not a condition TERM OP NUMBER (OP: {', '.join(OPS)}), e.g. "
                        "'all_correct >= 1' or 'style_striped < 0.5'")
    return Condition(match.group(1), match.group(2), value)


def parse_conditions(texts, key: str) -> list[Condition]:
    return [parse_condition(text, key) for text in texts]


class PairFilter:
    """The filter of a config: its reward and the conditions on each side (see the module docstring)."""

    def __init__(self, reward, chosen: list[Condition], rejected: list[Condition]):
        self.reward, self.conditions = reward, (chosen, rejected)

    @classmethod
    def from_config(cls, cfg, reward) -> "PairFilter":
        return cls(reward, parse_conditions(cfg.filter_chosen, "filter_chosen"),
                   parse_conditions(cfg.filter_rejected, "filter_rejected"))

    def check_terms(self) -> None:
        """Fail before any sampling if a condition names no term of the reward (one call on a blank image)."""
        from PIL import Image

        terms = set(self.reward.details([Image.new("RGB", (64, 64), (200, 200, 200))], [""]))
        for key, conditions in zip(("filter_chosen", "filter_rejected"), self.conditions):
            for c in conditions:
                if c.term not in terms:
                    raise UserError(f"{key}: '{c.term}' is not a term of reward '{self.reward.name}'; its terms are: "
                                    f"{', '.join(sorted(terms))}")

    def _values(self, pil: list, prompts: list[str], terms: set[str]) -> dict[str, list[float]]:
        out = {}
        if "score" in terms:  # the reward's own score (for a term reward, its term), as score_key reads it
            out["score"] = self.reward.score(pil, prompts)
        if terms - {"score"}:
            details = self.reward.details(pil, prompts)
            out.update({t: details[t] for t in terms - {"score"}})
        return {t: [float(v) for v in values.detach().double().cpu().tolist()] for t, values in out.items()}

    def passes(self, units: list[Unit], images, chunk: int) -> list[tuple[bool, bool]]:
        """(chosen ok, rejected ok) per unit. Sides with conditions are scored in fixed chunks of `chunk` images
        (side by side, unit by unit), each against its filter prompt; a side without conditions passes."""
        flat = [(u, k) for u in units for k in (0, 1) if self.conditions[k]]
        terms = {c.term for side in self.conditions for c in side}
        ok = {}
        for start in range(0, len(flat), chunk):
            part = flat[start : start + chunk]
            values = self._values([images.pil(u.sides[k]) for u, k in part], [u.filter_prompts[k] for u, k in part],
                                  terms)
            for n, (u, k) in enumerate(part):
                ok[u.index, k] = all(c.holds(values[c.term][n]) for c in self.conditions[k])
        return [(ok.get((u.index, 0), True), ok.get((u.index, 1), True)) for u in units]


def judge_try(chosen_ok: bool, rejected_ok: bool, scores, margin: float) -> tuple[list[tuple[int, int, int]], list[str]]:
    """One try of a two-sided unit: ([(0, 0, 1)] if its pair is kept, else []) and every check it failed.

    The filter first (chosen_failed, rejected_failed; both can fail), then, only if both sides passed, the
    reward check on `scores` (None: no reward) with `margin` (reversed, gap_below_margin or unscored)."""
    failed = [why for why, ok in ((CHOSEN_FAILED, chosen_ok), (REJECTED_FAILED, rejected_ok)) if not ok]
    if failed:
        return [], failed
    kept, why = decide_two(scores, margin)
    return kept, sorted(why)


@dataclass
class Outcome:
    """What became of one unit: the try whose pair was kept (or its last try), and the counts of its tries."""

    unit: Unit
    scores: list[float] | None  # the reward check's score of each side (None: no reward, or not scored)
    kept: list[tuple[int, int, int]]  # (slot, winner, loser) triples, as `Recipe.decide` gives them
    skipped: Counter  # what the unit counts as when nothing is kept (reason -> pairs)
    tries: int = 1  # tries used
    failed_tries: Counter | None = None  # reason -> tries that failed for it (a try can fail two filter checks)


__all__ = ["CHOSEN_FAILED", "Condition", "Outcome", "PairFilter", "REJECTED_FAILED", "judge_try", "parse_condition",
           "parse_conditions"]
