"""The toy reward, registered as `toy`: prompt fidelity in the toy world, read by the toy judge
(`diffalign.toy.judge`). With `diffalign.models.source` (the model alias `toy`), `diffalign.data.prompts` (the
prompt sets `toy:train` / `toy:heldout`) and `diffalign.evaluation.toy_distribution` (the set measure `toy`),
one of the few modules outside `toy/` that import it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..toy.judge import load_judge
from ..toy.world import parse_caption
from .base import Reward, check_prompts, images_to_tensor
from .registry import register_reward


class ToyReward(Reward):
    """Prompt fidelity in the toy world, read by the toy judge (`diffalign.toy.judge`).

    score = mean, over the attributes the prompt names (shape, colour, size, style as `parse_caption`
    reads them), of the judge's probability for the named value. A prompt that names none ("", "a shape")
    asks nothing in particular, so it scores the mean over all four attributes of the judge's *largest*
    probability: how clearly the image shows some valid scene, i.e. its fidelity to its best-matching full
    caption. Scores are in [0, 1]. A prompt without a style word does not ask for "plain": style is unnamed.
    """

    name = "toy"
    ATTRIBUTES = ("shape", "colour", "size", "style")

    def __init__(self, judge_path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 512):
        self.judge = load_judge(judge_path, device=device)
        self.batch_size = batch_size
        self.resolution = int(self.judge.arch.resolution)

    def probabilities(self, images) -> dict[str, torch.Tensor]:
        x = images_to_tensor(images, size=self.resolution)
        return self.judge.probabilities(x, batch_size=self.batch_size)

    def _named_indices(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per attribute, the vocabulary index each prompt names, -1 where it names none."""
        parsed = [parse_caption(p) for p in prompts]
        out = {}
        for attr in self.ATTRIBUTES:
            vocab = self.judge.vocabs[attr]
            out[attr] = torch.tensor([vocab.index(d[attr]) if d[attr] in vocab else -1 for d in parsed], dtype=torch.long)
        return out

    def details(self, images, prompts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """`score`; per attribute `{attr}_prob` (probability of the named value) and `{attr}_correct`
        (1.0 if the judge's top choice is the named value, else 0.0), both NaN where the prompt does not
        name the attribute; `shape_colour_correct` (NaN unless both are named); `style_plain`,
        `style_outlined`, `style_striped`: the judge's style probabilities, whatever the prompt says;
        `clarity`: the judge's top probability averaged over the four attributes, whatever the prompt
        says - how clearly the image shows *some* valid scene (a stand-in for the papers' quality rewards);
        `all_correct`: 1.0 if every attribute the prompt names is judged correct (the judge's top choice is
        the named value for each), else 0.0; NaN if the prompt names none."""
        probs = self.probabilities(images)
        n = len(next(iter(probs.values())))
        named = self._named_indices(check_prompts(prompts, n))
        out: dict[str, torch.Tensor] = {}
        total, count = torch.zeros(n), torch.zeros(n)
        wrong = torch.zeros(n, dtype=torch.bool)  # some named attribute judged otherwise
        nan = torch.full((n,), math.nan)
        for attr in self.ATTRIBUTES:
            idx, p = named[attr], probs[attr]
            has = idx >= 0
            p_named = p.gather(1, idx.clamp(min=0)[:, None]).squeeze(1)
            correct = (p.argmax(1) == idx).float()
            out[f"{attr}_prob"] = torch.where(has, p_named, nan)
            out[f"{attr}_correct"] = torch.where(has, correct, nan)
            total += torch.where(has, p_named, torch.zeros(n))
            count += has.float()
            wrong |= has & (correct == 0)
        best = torch.stack([probs[a].amax(1) for a in self.ATTRIBUTES]).mean(0)
        out["score"] = torch.where(count > 0, total / count.clamp(min=1), best)
        out["clarity"] = best
        both = (named["shape"] >= 0) & (named["colour"] >= 0)
        out["shape_colour_correct"] = torch.where(both, out["shape_correct"] * out["colour_correct"], nan)
        out["all_correct"] = torch.where(count > 0, (~wrong).float(), nan)
        for i, style in enumerate(self.judge.vocabs["style"]):
            out[f"style_{style}"] = probs["style"][:, i]
        return out

    def score(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        return self.details(images, prompts)["score"]


class ToyTermReward(ToyReward):
    """One named term of `ToyReward.details` as the score, e.g. `style_striped` (how striped an image looks,
    whatever the prompt says: the Pick-Style target), `shape_colour_correct` (1 when the judge reads the
    prompt's shape and colour, NaN when the prompt does not name both) or `all_correct` (1 when it reads
    every attribute the prompt names)."""

    def __init__(self, term: str, judge_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 512):
        super().__init__(judge_path, device=device, batch_size=batch_size)
        terms = [f"{a}_{k}" for a in self.ATTRIBUTES for k in ("prob", "correct")]
        terms += ["shape_colour_correct", "all_correct", "clarity"] + [f"style_{s}" for s in self.judge.vocabs["style"]]
        if term not in terms:
            raise UserError(f"the toy reward has no term '{term}': choose one of {', '.join(terms)}")
        self.term = term
        self.name = f"toy:{term}"

    def score(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        return self.details(images, prompts)[self.term]


@register_reward("toy", options=("term",))
def _toy(path: str | None, device=None, batch_size=None, term: str | None = None) -> Reward:
    if term:
        return ToyTermReward(term, path, device=device or "cpu", batch_size=batch_size or 512)
    return ToyReward(path, device=device or "cpu", batch_size=batch_size or 512)


__all__ = ["ToyReward", "ToyTermReward"]
