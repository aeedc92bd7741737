"""Prompt fidelity of a toy pipeline, measured by the judge: how often samples show the asked shape and colour.

The prompt set and seeds are fixed before looking at any result: every "a {colour} {shape}" prompt
repeated `repeats` times, image i seeded with `seed + i`, the same for every guidance scale and model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .world import COLOUR_NAMES, SHAPES, caption

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def fidelity_prompts(repeats: int = 10) -> list[str]:
    combos = [caption(shape=s, colour=c) for s in SHAPES for c in COLOUR_NAMES]
    return [p for _ in range(repeats) for p in combos]


@dataclass
class FidelityResult:
    guidance_scale: float
    n: int
    shape: float
    colour: float
    shape_and_colour: float

    @property
    def stderr(self) -> float:
        p = self.shape_and_colour
        return float(np.sqrt(p * (1 - p) / self.n))


@torch.no_grad()
def sample_images(pipe: DiffusionPipeline, prompts: list[str], guidance_scale: float, steps: int = 20, seed: int = 0,
                  batch_size: int = 120, negative_prompts: list[str] | None = None):
    """Image i (seed + i) for prompts[i], uint8 [N, H, W, 3]; ``negative_prompts`` (one per prompt) go to the
    unconditional branch (default: the empty prompt)."""
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"need one negative prompt per prompt, got {len(negative_prompts)} for {len(prompts)}")
    pipe.set_progress_bar_config(disable=True)
    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"sample g={guidance_scale}", unit="batch", leave=False):
        batch = prompts[start : start + batch_size]
        negative = None if negative_prompts is None else negative_prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        out.append(
            pipe(batch, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                 generator=gens, output_type="np", negative_prompt=negative).images
        )
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def measure_fidelity(pipe: DiffusionPipeline, reward, guidance_scales=(1.0, 3.0, 7.5), repeats: int = 10,
                     steps: int = 20, seed: int = 0):
    """Judge accuracy of shape, colour and both at each guidance scale. Returns a list of FidelityResult."""
    prompts = fidelity_prompts(repeats)
    results = []
    for g in guidance_scales:
        images = sample_images(pipe, prompts, g, steps=steps, seed=seed)
        details = reward.details(images, prompts)
        shape_ok = details["shape_correct"].float()
        colour_ok = details["colour_correct"].float()
        results.append(
            FidelityResult(
                guidance_scale=g,
                n=len(prompts),
                shape=shape_ok.mean().item(),
                colour=colour_ok.mean().item(),
                shape_and_colour=(shape_ok * colour_ok).mean().item(),
            )
        )
    return results


def format_table(results: list[FidelityResult]) -> str:
    lines = ["| guidance | shape | colour | shape and colour (± s.e.) |", "|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.guidance_scale:g} | {100 * r.shape:.1f}% | {100 * r.colour:.1f}% | "
            f"{100 * r.shape_and_colour:.1f}% ± {100 * r.stderr:.1f} |"
        )
    return "\n".join(lines)
