"""The toy world's set-level quality measures: FD, precision and recall of generated images against
ground-truth renders of the same prompts, in the toy judge's feature space (`distribution` has the formulas).

- **Features**: the judge's pooled penultimate layer (`ToyJudge.pooled_features`: the spatial mean and max of
  its last conv layer, 2 x 128 numbers), the representation all its heads read.
- **Reference set**: for every prompt, `references_per_image` renders per generated image of that prompt. A
  render shows a scene the caption describes: the attributes it names as named, the others drawn as the
  world's training data has them *given that caption* (`caption_style_weights`): for shape, colour and size
  that is the world's prior itself (uniform); for the style it is the prior reweighted by the chance the
  caption shows no style word, since captions never write "plain" and drop a named style 30% of the time.
  Each prompt has its own seeded stream, drawn one scene at a time, so a prompt's first m renders are the
  same whatever the count asked for, and every folder evaluated with the same prompts gets the same ones.
- **VAE round trip** (`vae="toy"`, the default): the renders are encoded and decoded by the shipped toy
  pipeline's VAE and stored as 8-bit, like a generated image. A generated image is a VAE decode, so the
  round trip is the best it can look: the fair reference. `vae=None` compares with the raw renders.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..models.source import resolve_model
from ..rewards import images_to_tensor, parse_reward_spec
from .distribution import (
    DEFAULT_K,
    DEFAULT_SAMPLES,
    DistributionDifference,
    DistributionMetrics,
    distribution_metrics,
    paired_distribution_difference,
)

# Options of a `--distribution toy[=JUDGE_DIR][:KEY=VALUE]...` spec, with their defaults.
SPEC_OPTIONS = {"k": DEFAULT_K, "refs": 1, "ref_seed": 0, "vae": "toy", "bootstrap": DEFAULT_SAMPLES}


def caption_style_weights(prompt: str) -> tuple[float, ...]:
    """Probabilities of each style (in `STYLES` order) for a scene whose training caption is `prompt`.

    A caption naming a style fixes it. Otherwise Bayes on the world's caption rule: a training caption shows
    no style word when the style is plain (never written) or when a named style was dropped (probability
    1 - P_STYLE), so P(style | no word) is proportional to prior(style) * (1 if plain else 1 - P_STYLE). The
    empty prompt is the exception: empty captions are drawn whatever the scene, so the prior stays as it is.
    """
    from ..toy.world import P_STYLE, STYLE_PRIOR, STYLES, parse_caption

    named = parse_caption(prompt)["style"]
    if named is not None:
        return tuple(1.0 if s == named else 0.0 for s in STYLES)
    prior = np.asarray(STYLE_PRIOR, dtype=np.float64) / np.sum(STYLE_PRIOR)
    if not prompt.strip():
        return tuple(float(p) for p in prior)
    weights = prior * np.array([1.0 if s == "plain" else 1.0 - P_STYLE for s in STYLES])
    return tuple(float(w) for w in weights / weights.sum())


def _prompt_stream(prompt: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(prompt.encode("utf-8"))])


def reference_renders(prompt: str, n: int, seed: int = 0) -> tuple[list, np.ndarray]:
    """(scenes, uint8 renders (n, 32, 32, 3)) of `n` scenes `prompt` describes (see the module docstring):
    named attributes as named, the rest from the world's sampler with `caption_style_weights`. Drawn one
    scene at a time from the prompt's own stream, so the first m are the same for every n >= m."""
    from ..toy.render import RESOLUTION, render
    from ..toy.world import parse_caption, sample_scenes

    named = {key: value for key, value in parse_caption(prompt).items() if value is not None}
    weights = caption_style_weights(prompt)
    rng = _prompt_stream(prompt, seed)
    scenes, images = [], []
    for _ in range(n):
        scene = replace(sample_scenes(1, rng, style_prior=weights)[0], **named)
        scenes.append(scene)
        images.append(render([scene], rng)[0])
    return scenes, np.stack(images) if images else np.zeros((0, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)


def _load_reference_vae(vae):
    """'toy' -> the shipped toy pipeline's VAE; None or 'none' -> no round trip; a path -> that pipeline's
    (or bare AutoencoderKL folder's) VAE; an AutoencoderKL object as it is."""
    if vae is None or (isinstance(vae, str) and vae.lower() == "none"):
        return None
    if isinstance(vae, (str, Path)):
        from ..toy.judge import _load_vae

        return _load_vae(resolve_model(vae))
    return vae


class ToyDistribution:
    """Judge features of images and of their ground-truth references, and the set measures between them.

    Reference features are cached per prompt, so several folders with the same prompts share one reference.
    """

    def __init__(self, judge_path: str | Path | None = None, *, vae="toy", k: int = DEFAULT_K,
                 references_per_image: int = 1, reference_seed: int = 0, samples: int = DEFAULT_SAMPLES,
                 device="cpu", batch_size: int = 512):
        from ..toy.judge import load_judge

        if int(references_per_image) != references_per_image or references_per_image < 1:
            raise UserError(f"references per image must be a positive integer, got {references_per_image}")
        if int(k) != k or k < 1:
            raise UserError(f"k must be a positive integer, got {k}")
        self.judge = load_judge(judge_path, device=device)
        self.vae = _load_reference_vae(vae)
        named = str(vae) if isinstance(vae, (str, Path)) else type(vae).__name__
        self.vae_name = "none" if self.vae is None else named
        self.k, self.samples, self.batch_size = int(k), int(samples), batch_size
        self.references_per_image, self.reference_seed = int(references_per_image), int(reference_seed)
        self.spec = "toy"
        self._cache: dict[str, np.ndarray] = {}

    def describe(self) -> dict:
        """The settings a report needs to say what was measured."""
        return {"spec": self.spec, "features": "toy judge, pooled penultimate layer", "k": self.k,
                "references_per_image": self.references_per_image, "reference_seed": self.reference_seed,
                "reference_vae": self.vae_name, "bootstrap": self.samples}

    def _features_of_tensor(self, x) -> np.ndarray:
        return self.judge.pooled_features(x, batch_size=self.batch_size).double().numpy()

    def features(self, images) -> np.ndarray:
        """(N, 256) judge features of images in any form `images_to_tensor` takes (resized to the judge's size)."""
        return self._features_of_tensor(images_to_tensor(images, size=int(self.judge.arch.resolution)))

    def reference_features(self, prompt: str, n: int) -> np.ndarray:
        """Features of the first `n` references of `prompt` (rendered, round-tripped, stored as 8-bit)."""
        from ..toy.judge import vae_round_trip
        from ..toy.render import to_tensor, to_uint8

        cached = self._cache.get(prompt)
        if cached is None or len(cached) < n:
            x = to_tensor(reference_renders(prompt, n, self.reference_seed)[1])
            if self.vae is not None and n:
                x = to_tensor(to_uint8(vae_round_trip(self.vae, x)))
            self._cache[prompt] = cached = self._features_of_tensor(x)
        return cached[:n]

    def reference_for(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(features, prompt of each row) of the reference for a set with these prompts: per prompt,
        `references_per_image` times as many renders as the set has images of it."""
        counts: dict[str, int] = {}
        for prompt in prompts:
            counts[prompt] = counts.get(prompt, 0) + 1
        parts = [self.reference_features(p, c * self.references_per_image) for p, c in counts.items()]
        groups = [p for p, c in counts.items() for _ in range(c * self.references_per_image)]
        return np.concatenate(parts) if parts else np.zeros((0, 0)), groups

    def set_job(self, features: np.ndarray, prompts: Sequence[str], *, seed: int = 0,
                level: float = 0.95) -> tuple[Callable, dict]:
        """(function, keyword arguments) of `metrics_of_features`: plain arrays (the reference's features are
        computed here), so the bootstrap can run in another process (`distribution.run_jobs`)."""
        reference, groups = self.reference_for(prompts)
        return distribution_metrics, dict(generated=features, reference=reference, k=self.k, groups=list(prompts),
                                          reference_groups=groups, samples=self.samples, seed=seed, level=level)

    def difference_job(self, features: np.ndarray, baseline: np.ndarray, prompts: Sequence[str], *, seed: int = 0,
                       level: float = 0.95, unmatched_a: int = 0, unmatched_b: int = 0) -> tuple[Callable, dict]:
        """(function, keyword arguments) of `compare_features`, as `set_job`."""
        reference, groups = self.reference_for(prompts)
        return paired_distribution_difference, dict(
            a=features, b=baseline, reference=reference, k=self.k, groups=list(prompts), reference_groups=groups,
            samples=self.samples, seed=seed, level=level, unmatched_a=unmatched_a, unmatched_b=unmatched_b)

    def metrics_of_features(self, features: np.ndarray, prompts: Sequence[str], *, seed: int = 0,
                            level: float = 0.95) -> DistributionMetrics:
        """`distribution_metrics` of a set (features from `features`) against its reference, resampled by prompt."""
        fn, kwargs = self.set_job(features, prompts, seed=seed, level=level)
        return fn(**kwargs)

    def compare_features(self, features: np.ndarray, baseline: np.ndarray, prompts: Sequence[str], *,
                         seed: int = 0, level: float = 0.95, unmatched_a: int = 0,
                         unmatched_b: int = 0) -> DistributionDifference:
        """`paired_distribution_difference` of two matched sets (row i of each: same prompt and seed)."""
        fn, kwargs = self.difference_job(features, baseline, prompts, seed=seed, level=level,
                                         unmatched_a=unmatched_a, unmatched_b=unmatched_b)
        return fn(**kwargs)

    def metrics(self, images, prompts: Sequence[str], *, seed: int = 0, level: float = 0.95) -> DistributionMetrics:
        prompts = _one_prompt_each(prompts, len(images))
        return self.metrics_of_features(self.features(images), prompts, seed=seed, level=level)

    def compare(self, images, baseline_images, prompts: Sequence[str], *, seed: int = 0,
                level: float = 0.95) -> DistributionDifference:
        if len(images) != len(baseline_images):
            raise UserError(f"a paired comparison needs matched sets: got {len(images)} images and "
                            f"{len(baseline_images)} baseline images")
        prompts = _one_prompt_each(prompts, len(images))
        return self.compare_features(self.features(images), self.features(baseline_images), prompts,
                                     seed=seed, level=level)


def _one_prompt_each(prompts, n: int) -> list[str]:
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise UserError(f"got {n} images but {len(prompts)} prompts: pass one prompt per image")
    return prompts


def toy_distribution_metrics(images, prompts: Sequence[str], *, judge_path=None, vae="toy", k: int = DEFAULT_K,
                             references_per_image: int = 1, reference_seed: int = 0,
                             samples: int = DEFAULT_SAMPLES, seed: int = 0, level: float = 0.95,
                             device="cpu") -> DistributionMetrics:
    """FD, precision and recall (with bootstrap intervals) of toy images (PIL list, uint8 array, ...), one
    prompt each, against ground-truth references of the same prompts (see the module docstring)."""
    measure = ToyDistribution(judge_path, vae=vae, k=k, references_per_image=references_per_image,
                              reference_seed=reference_seed, samples=samples, device=device)
    return measure.metrics(images, prompts, seed=seed, level=level)


def compare_toy_distributions(images, baseline_images, prompts: Sequence[str], *, judge_path=None, vae="toy",
                              k: int = DEFAULT_K, references_per_image: int = 1, reference_seed: int = 0,
                              samples: int = DEFAULT_SAMPLES, seed: int = 0, level: float = 0.95,
                              device="cpu") -> DistributionDifference:
    """`images` minus `baseline_images` on FD, precision and recall, where image i of both sets was made for
    `prompts[i]` with the same seed; the interval is a paired bootstrap (pairs resampled jointly)."""
    measure = ToyDistribution(judge_path, vae=vae, k=k, references_per_image=references_per_image,
                              reference_seed=reference_seed, samples=samples, device=device)
    return measure.compare(images, baseline_images, prompts, seed=seed, level=level)


def _int_option(spec: str, key: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"distribution spec '{spec}': {key} must be an integer, got '{value}'") from None
    if number < minimum:
        raise UserError(f"distribution spec '{spec}': {key} must be at least {minimum}, got {number}")
    return number


def build_distribution(spec: str, device=None) -> ToyDistribution:
    """A measure from `toy[=JUDGE_DIR][:k=3][:refs=1][:ref_seed=0][:vae=toy|none|PATH][:bootstrap=1000]`."""
    parsed = parse_reward_spec(spec)
    if parsed.name != "toy":
        raise UserError(f"unknown distribution measure '{parsed.name}' in '{spec}': the one available is 'toy' "
                        "(toy[=JUDGE_DIR][:k=3][:refs=1][:ref_seed=0][:vae=toy|none|PATH][:bootstrap=1000])")
    unknown = sorted(set(parsed.options) - set(SPEC_OPTIONS))
    if unknown:
        raise UserError(f"distribution spec '{spec}' has no option {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(SPEC_OPTIONS)}")
    options = {**{k: str(v) for k, v in SPEC_OPTIONS.items()}, **parsed.options}
    measure = ToyDistribution(parsed.path, vae=options["vae"] or "none", k=_int_option(spec, "k", options["k"], 1),
                              references_per_image=_int_option(spec, "refs", options["refs"], 1),
                              reference_seed=_int_option(spec, "ref_seed", options["ref_seed"], 0),
                              samples=_int_option(spec, "bootstrap", options["bootstrap"], 1),
                              device=device if device is not None else "cpu")
    measure.spec = str(parsed)
    return measure
