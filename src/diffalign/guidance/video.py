"""Negative-branch CFG inside the stock `CogVideoXPipeline` (and saving what it generates).

Same maths as `unet.py`: `v = v_neg(x, t, c_neg) + g * (v_pos(x, t, c) - v_neg(x, t, c_neg))`, the stock CFG
combination once the first half of the pipeline's `[negative-prompt half; prompt half]` batch is predicted with
`theta_neg = theta_base + alpha*eta + beta*delta`. The pipeline keeps doing everything else: its scheduler,
rotary embeddings and `use_dynamic_cfg` (a guidance scale that changes every step - it only rescales
`g`, so routing the halves is all the wrapper does).

Two things differ from the UNet pipelines, hence a separate wrapper:
- the pipeline calls `pipe.transformer(hidden_states=..., encoder_hidden_states=..., timestep=...,
  image_rotary_emb=...)` with keywords, and the rotary embeddings are per token, not per sample, so they must
  never be split with the batch;
- `CogVideoXPipeline` has no `do_classifier_free_guidance` property, and with `use_dynamic_cfg` its
  `guidance_scale` changes during the call, so neither says whether a batch is a CFG batch. The pipeline
  always calls `encode_prompt(prompt, negative_prompt, do_classifier_free_guidance, ...)` first; the wrapper
  reads that flag there, per call.

Offsets must be LoRAs here (full transformer folders are not composed for video yet). Fast path: one call per
step, adapters `npo_pos` / `npo_neg` on the two halves (`sliced_adapter_batch`). `force_two_calls`: a merged
copy of the transformer predicts the negative half (a second model in memory, two calls; for reference).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..errors import UserError
from .denoiser import BASE, NEG_ADAPTER, GuidedDenoiser, sliced_adapter_batch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

_BATCHED = ("hidden_states", "encoder_hidden_states", "timestep")


class NegativeGuidedTransformer(GuidedDenoiser):
    """Looks like `pipe.transformer`; predicts the first half of a CFG batch with the negative weights.

    `negative is None`: fast path, `positive` holds both adapters and runs once. Otherwise `negative` is a merged
    transformer and each half goes to its own model. Non-CFG batches go to the positive model only.
    """

    def __init__(self, positive, negative=None, pos_adapter: str = BASE, neg_adapter: str = NEG_ADAPTER):
        super().__init__(positive, negative, pos_adapter, neg_adapter)
        #: Set by the pipeline's encode_prompt at the start of each call; None outside a pipeline call.
        self.cfg_active: bool | None = None

    def forward(self, *args, **kwargs):
        # Positional arguments follow CogVideoXTransformer3DModel.forward; name them so halves can be cut.
        for name, value in zip(_BATCHED, args):
            kwargs[name] = value
        extra = args[len(_BATCHED):]
        n = kwargs["hidden_states"].shape[0]
        cfg = n % 2 == 0 and self.cfg_active is not False
        if self.fast:
            half = n // 2
            parts = [(slice(0, half), self.neg_adapter), (slice(half, n), self.pos_adapter)] if cfg else [
                (slice(0, n), self.pos_adapter)]
            with sliced_adapter_batch(self.positive, parts, self.adapter_layers()):
                return self.positive(*extra, **kwargs)
        if not cfg:
            return self.positive(*extra, **kwargs)
        outs = []
        for model, part in ((self.negative, slice(0, n // 2)), (self.positive, slice(n // 2, n))):
            own = {k: (v[part] if k in _BATCHED and torch.is_tensor(v) and v.ndim > 0 else v) for k, v in kwargs.items()}
            outs.append(model(*extra, **own))
        pred = torch.cat([o[0] if isinstance(o, tuple) else o.sample for o in outs])
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=pred)
        return (pred,)


def _watch_cfg(pipe: DiffusionPipeline, wrapper: NegativeGuidedTransformer) -> None:
    """Record the pipeline's do_classifier_free_guidance from its encode_prompt call (the 3rd argument)."""
    original = type(pipe).encode_prompt.__get__(pipe)

    def encode_prompt(*args, **kwargs):
        flag = args[2] if len(args) > 2 else kwargs.get("do_classifier_free_guidance", True)
        wrapper.cfg_active = bool(flag)
        return original(*args, **kwargs)

    object.__setattr__(pipe, "encode_prompt", encode_prompt)


def wrap_transformer(pipe: DiffusionPipeline, positive, negative, pos_adapter: str = BASE) -> NegativeGuidedTransformer:
    """The wrapper `attach_negative_guidance` puts in `pipe.transformer`; the pipeline's encode_prompt tells it
    whether a call is a CFG call."""
    wrapper = NegativeGuidedTransformer(positive.eval(), negative, pos_adapter=pos_adapter)
    _watch_cfg(pipe, wrapper)
    return wrapper


def unwatch_cfg(pipe: DiffusionPipeline) -> None:
    """Give the pipeline its own encode_prompt back."""
    pipe.__dict__.pop("encode_prompt", None)


def save_video(frames: Any, out_dir: str | os.PathLike, fps: int = 8, name: str = "video") -> dict[str, Any]:
    """Write one clip as PNG frames (`frame_000.png`, ...) plus `name.mp4` when diffusers can export video
    (imageio + imageio-ffmpeg, or OpenCV installed), else an animated `name.gif` (Pillow is always there).

    `frames`: a list of PIL images or an array (F, H, W, 3) in [0, 1] (float) or uint8 - what
    `CogVideoXPipeline(...).frames[i]` gives for output_type "pil" or "np". Returns {"frames": [...], "video": path}.
    """
    from PIL import Image

    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], Image.Image):
        images = [f.convert("RGB") for f in frames]
    else:
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise UserError(f"frames must be (F, H, W, 3) or a list of PIL images, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        images = [Image.fromarray(f) for f in arr]
    if not images:
        raise UserError("no frames to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"frame_{i:03d}.png")
        image.save(paths[-1])
    video = None
    if mp4_available():
        from diffusers.utils import export_to_video

        try:
            video = Path(export_to_video(images, str(out / f"{name}.mp4"), fps=fps))
        except (ImportError, AttributeError, OSError, RuntimeError) as exc:  # e.g. imageio without its ffmpeg
            logger.warning("mp4 export failed (%s); writing a GIF instead", exc)
    if video is None:
        video = out / f"{name}.gif"
        images[0].save(video, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return {"frames": paths, "video": video}


def mp4_available() -> bool:
    """diffusers' export_to_video needs imageio (+ imageio-ffmpeg) or OpenCV; neither is a diffalign dependency."""
    from diffusers.utils.import_utils import is_imageio_available, is_opencv_available

    return bool(is_imageio_available() or is_opencv_available())


def generate_videos(pipe: DiffusionPipeline, prompts: Sequence[str], out_dir: str | os.PathLike, *, seed: int = 0, fps: int = 8,
                    **call_kwargs: Any) -> list[dict[str, Any]]:
    """Run `pipe` (guided or not) once per prompt with seeds `seed + i` and save each clip to `out_dir/<i>/`."""
    results = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed + i)
        frames = pipe(prompt, generator=gen, output_type="np", **call_kwargs).frames[0]
        results.append({"prompt": prompt, **save_video(frames, Path(out_dir) / f"{i:03d}", fps=fps)})
    return results


__all__ = [
    "NegativeGuidedTransformer",
    "generate_videos",
    "mp4_available",
    "save_video",
    "unwatch_cfg",
    "wrap_transformer",
]
