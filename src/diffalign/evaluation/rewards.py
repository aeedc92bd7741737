"""Reward models behind one interface: `score(images, prompts) -> Tensor[N]`, higher is better.

Every reward takes images in any of the forms the rest of the project produces (see `images_to_tensor`)
and one prompt per image. `get_reward(spec)` builds one from a spec string

    NAME[=PATH][:KEY=VALUE]...      e.g.  toy   pickscore=/models/pick:processor=/models/clip-h

where PATH is a local folder/file or hub id and the KEY=VALUE options are the ones the reward declares
(an option starts at a ':' followed by a word and '=', so 'C:\\models' stays one path). Rewards register
themselves with `@register_reward("name", options=(...))`: toy here, pickscore/clip/aesthetic in
`clip_rewards`, hpsv2/imagereward in `optional_rewards`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError


def images_to_tensor(images, size: int | None = None) -> torch.Tensor:
    """Any supported image batch -> float tensor (N, 3, H, W) in [-1, 1] on the CPU.

    Accepted: a list/tuple of PIL images; a uint8 numpy array (N, H, W, 3); a float numpy array
    (N, H, W, 3) in [0, 1] (diffusers' `output_type="np"`); a float tensor (N, 3, H, W) in [-1, 1]
    (the VAE's range). With `size`, images are resized (bilinear, antialiased) to size x size.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise UserError(f"image tensors must be float (N, 3, H, W) in [-1, 1]; got {images.dtype} {tuple(images.shape)}")
        x = images.detach().float().cpu()
    else:
        if isinstance(images, (list, tuple)):
            if not images:
                return torch.zeros(0, 3, size or 0, size or 0)
            if all(isinstance(im, np.ndarray) for im in images):
                array = np.stack(images)
            else:
                array = np.stack([_pil_to_array(im) for im in images])
        elif isinstance(images, np.ndarray):
            array = images
        else:
            raise UserError(f"unsupported images of type {type(images).__name__}: pass PIL images, a numpy array or a tensor")
        if array.ndim != 4 or array.shape[-1] != 3:
            raise UserError(f"image arrays must be (N, H, W, 3); got shape {array.shape}")
        if array.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        elif np.issubdtype(array.dtype, np.floating):
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2).mul(2.0).sub(1.0)
        else:
            raise UserError(f"image arrays must be uint8 or float in [0, 1]; got {array.dtype}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _pil_to_array(image) -> np.ndarray:
    if not hasattr(image, "convert"):
        raise UserError(f"unsupported image of type {type(image).__name__} in the list: expected PIL images")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _check_prompts(prompts, n: int) -> list[str]:
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise UserError(f"got {n} images but {len(prompts)} prompts: pass one prompt per image")
    return prompts


class Reward:
    """Base class. Subclasses set `name` and implement `score`; `details` adds named per-image terms."""

    name: str = ""
    spec: str = ""  # the spec it was built from by `get_reward` (for reports)

    def score(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        """One float per image (Tensor[N]), higher is better."""
        raise NotImplementedError

    def details(self, images, prompts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """Named per-image terms (each Tensor[N]); always includes `score`."""
        return {"score": self.score(images, prompts)}

    def __call__(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        return self.score(images, prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: `NAME[=PATH][:KEY=VALUE]...`."""

    name: str
    path: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = self.name + (f"={self.path}" if self.path else "")
        return text + "".join(f":{k}={v}" for k, v in self.options.items())


# An option begins at ':' followed by an identifier and '='; any other ':' belongs to the path.
_OPTION_START = re.compile(r":(?=[A-Za-z_]\w*=)")


def parse_reward_spec(spec: str) -> RewardSpec:
    head, *option_texts = _OPTION_START.split(str(spec).strip())
    name, _, path = head.partition("=")
    options: dict[str, str] = {}
    for text in option_texts:
        key, _, value = text.partition("=")
        if key in options:
            raise UserError(f"reward spec '{spec}' gives option '{key}' twice: keep one")
        options[key] = value.strip()
    if not name.strip():
        raise UserError(f"reward spec '{spec}' has no name: write NAME[=PATH][:KEY=VALUE], e.g. toy or pickscore=FOLDER")
    return RewardSpec(name.strip(), path.strip() or None, options)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Reward]
    options: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_reward(name: str, options: Sequence[str] = ()):
    """Decorator: `factory(path_or_None, *, device, batch_size, **options) -> Reward` becomes available as
    `get_reward("name[=PATH][:option=VALUE]")`. `options` lists the spec options the factory accepts;
    `device`/`batch_size` are None unless the caller chose them (the factory's defaults apply)."""

    def wrap(factory):
        _REGISTRY[name] = _Entry(factory, tuple(options))
        return factory

    return wrap


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(spec: str | RewardSpec, device: str | torch.device | None = None, batch_size: int | None = None) -> Reward:
    """Build a reward from a spec (see the module docstring), e.g. `toy`, `toy=/path/to/judge`,
    `aesthetic=/models/clip-l14:head=/models/head.pth`."""
    parsed = spec if isinstance(spec, RewardSpec) else parse_reward_spec(spec)
    entry = _REGISTRY.get(parsed.name)
    if entry is None:
        raise UserError(f"unknown reward '{parsed.name}': known rewards are {', '.join(available_rewards())} "
                        "(spec: NAME[=PATH][:KEY=VALUE])")
    unknown = sorted(set(parsed.options) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise UserError(f"reward '{parsed.name}' has no option {', '.join(map(repr, unknown))} (in spec '{parsed}'); "
                        f"its options: {allowed}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"reward batch size must be at least 1, got {batch_size}")
    reward = entry.factory(parsed.path, device=device, batch_size=batch_size, **parsed.options)
    reward.spec = str(parsed)
    return reward


def images_to_pil(images) -> list:
    """Any supported image batch (see `images_to_tensor`) -> list of RGB PIL images, for processors that
    want PIL input exactly as the reference implementations feed it."""
    from PIL import Image

    if isinstance(images, (list, tuple)) and all(hasattr(im, "convert") for im in images):
        return [im.convert("RGB") for im in images]
    x = images_to_tensor(images)
    array = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def check_prompts(prompts, n: int) -> list[str]:
    """One prompt per image: a single string is repeated; a sequence must have length n."""
    return _check_prompts(prompts, n)


# ----------------------------------------------------------------------------------------------- toy


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
        # Imported here, not at module level: core modules must not depend on `toy` at import time.
        from ..toy.judge import load_judge

        self.judge = load_judge(judge_path, device=device)
        self.batch_size = batch_size
        self.resolution = int(self.judge.arch.resolution)

    def probabilities(self, images) -> dict[str, torch.Tensor]:
        x = images_to_tensor(images, size=self.resolution)
        return self.judge.probabilities(x, batch_size=self.batch_size)

    def _named_indices(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per attribute, the vocabulary index each prompt names, -1 where it names none."""
        from ..toy.world import parse_caption

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
        named = self._named_indices(_check_prompts(prompts, n))
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
