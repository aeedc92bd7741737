"""Negative-branch guidance (Diffusion-NPO, Self-NPO) inside stock diffusers pipelines.

`attach_negative_guidance(pipe, negative=..., positive=..., alpha=1, beta=1)` makes a stock SD/SDXL pipeline
sample with `eps = eps_neg(x,t,c_neg) + g*(eps_pos(x,t,c) - eps_neg(x,t,c_neg))` where the negative weights are
`theta_base + alpha*eta + beta*delta`. LoRA offsets run in one batched UNet call per step; full-UNet offsets
need a second UNet and two calls (`extract_lora` converts them). CogVideoX pipelines (a transformer instead of a
UNet) get the same `attach.py` with the wrapper of `video.py`, which also saves generated clips as frames plus an
mp4 or GIF.
"""

from .attach import attach_negative_guidance, detach_negative_guidance
from .denoiser import GuidanceInfo, mixed_adapter_batch, sliced_adapter_batch
from .extract import extract_lora, extract_lora_factors
from .offsets import (
    Offset,
    compose_dense_unet,
    compose_lora_factors,
    lora_factors,
    read_lora,
    resolve_offset,
)
from .unet import NegativeGuidedUNet, export_negative_unet
from .video import NegativeGuidedTransformer, generate_videos, save_video

# One attach / detach serves every family; the video names stay for code written against them.
attach_video_negative_guidance = attach_negative_guidance
detach_video_negative_guidance = detach_negative_guidance

__all__ = [
    "Offset",
    "GuidanceInfo",
    "NegativeGuidedUNet",
    "NegativeGuidedTransformer",
    "attach_video_negative_guidance",
    "detach_video_negative_guidance",
    "generate_videos",
    "save_video",
    "attach_negative_guidance",
    "detach_negative_guidance",
    "export_negative_unet",
    "compose_dense_unet",
    "compose_lora_factors",
    "extract_lora",
    "extract_lora_factors",
    "lora_factors",
    "mixed_adapter_batch",
    "sliced_adapter_batch",
    "read_lora",
    "resolve_offset",
]
