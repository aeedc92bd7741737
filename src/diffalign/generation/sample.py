"""Sample a pipeline to a folder of PNGs plus `manifest.jsonl` (file, prompt, seed, settings).

Every image has its own seed (`seed + row`), drawn from its own generator, so an image does not depend on
the batch size or on which other prompts share its batch: the same seed and settings give the same images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..fsutil import ensure_writable_dir


@dataclass
class GenerationSettings:
    guidance_scale: float = 7.5
    num_inference_steps: int = 20
    seed: int = 0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    batch_size: int = 16
    num_images_per_prompt: int = 1
    negative_prompt: str | None = None
    extra: dict = field(default_factory=dict)  # recorded in the manifest as given (model, lora, ...)


@dataclass
class GeneratedImage:
    file: str
    prompt: str
    seed: int
    index: int


def native_size(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def generate_to_folder(pipe, prompts: list[str], out_dir: str | Path, settings: GenerationSettings) -> list[GeneratedImage]:
    """Generate `num_images_per_prompt` images per prompt into `out_dir`; returns the manifest rows."""
    out = ensure_writable_dir(out_dir)
    height = settings.height or native_size(pipe)
    width = settings.width or native_size(pipe)
    rows = [(p, k) for p in prompts for k in range(settings.num_images_per_prompt)]
    record = {
        "guidance_scale": settings.guidance_scale,
        "num_inference_steps": settings.num_inference_steps,
        "height": height,
        "width": width,
        "negative_prompt": settings.negative_prompt,
        "scheduler": type(pipe.scheduler).__name__,
        **settings.extra,
    }
    pipe.set_progress_bar_config(disable=True)
    results: list[GeneratedImage] = []
    manifest = (out / "manifest.jsonl").open("w", encoding="utf-8")
    bar = tqdm(total=len(rows), desc="generate", unit="img")
    for start in range(0, len(rows), settings.batch_size):
        batch = rows[start : start + settings.batch_size]
        seeds = [settings.seed + start + i for i in range(len(batch))]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        kwargs = {}
        if settings.negative_prompt is not None:
            kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
        images = pipe(
            prompt=[p for p, _ in batch],
            height=height,
            width=width,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
            **kwargs,
        ).images
        for i, ((prompt, _), seed, image) in enumerate(zip(batch, seeds, images)):
            index = start + i
            name = f"{index:05d}.png"
            image.save(out / name)
            row = GeneratedImage(file=name, prompt=prompt, seed=seed, index=index)
            manifest.write(json.dumps({**asdict(row), "settings": record}) + "\n")
            results.append(row)
        manifest.flush()
        bar.update(len(batch))
    bar.close()
    manifest.close()
    return results


def read_manifest(folder: str | Path) -> list[dict]:
    path = Path(folder) / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
