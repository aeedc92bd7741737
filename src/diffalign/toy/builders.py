"""Builders of small but real diffusers pipelines: random-init tiny SD/SDXL for tests, and the toy model's
architecture for `diffalign toy pretrain`. Everything is made offline, from code."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokenizer import MODEL_MAX_LENGTH, load_tokenizer, write_tokenizer_files


@dataclass(frozen=True)
class Arch:
    """Sizes of one tiny architecture (all components)."""

    unet_channels: tuple[int, ...]
    unet_down: tuple[str, ...]
    unet_up: tuple[str, ...]
    unet_heads: int
    unet_groups: int
    vae_channels: tuple[int, ...]
    vae_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    sample_size: int  # pixels


# Tests: as small as diffusers allows while still exercising cross-attention and up/down blocks.
TINY = Arch(
    unet_channels=(16, 32),
    unet_down=("DownBlock2D", "CrossAttnDownBlock2D"),
    unet_up=("CrossAttnUpBlock2D", "UpBlock2D"),
    unet_heads=2,
    unet_groups=8,
    vae_channels=(8, 16),
    vae_groups=4,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    sample_size=32,
)

# The shipped toy model: 4.1 M-parameter UNet, 0.16 M VAE, latent 4x16x16
# (docs/toy_world.md#the-shipped-model-diffalign-toy-path).
TOY = Arch(
    unet_channels=(32, 64, 128),
    unet_down=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    unet_heads=8,
    unet_groups=8,
    vae_channels=(16, 32),
    vae_groups=8,
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    sample_size=32,
)


def _tokenizer(tmp: Path | None = None):
    folder = Path(tmp or tempfile.mkdtemp(prefix="diffalign-tok-"))
    return load_tokenizer(write_tokenizer_files(folder))


def _text_config(tokenizer, arch: Arch, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_hidden * 2,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        # The real ids: CLIP pools at the eos token, found by id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def build_vae(arch: Arch = TOY, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=arch.vae_groups,
        sample_size=arch.sample_size,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,
    )


def _latent_size(arch: Arch) -> int:
    return arch.sample_size // 2 ** (len(arch.vae_channels) - 1)


def build_unet(arch: Arch = TOY, cross_attention_dim: int | None = None, sdxl: bool = False, text_embeds_dim: int = 0):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=_latent_size(arch),
        in_channels=4,
        out_channels=4,
        block_out_channels=arch.unet_channels,
        down_block_types=arch.unet_down,
        up_block_types=arch.unet_up,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim or arch.text_hidden,
        attention_head_dim=arch.unet_heads,
        norm_num_groups=arch.unet_groups,
    )
    if sdxl:
        time_dim = 8
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # six time ids (original size, crop top-left, target size), each embedded, plus the pooled text
            projection_class_embeddings_input_dim=6 * time_dim + text_embeds_dim,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(**kwargs)


def build_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    # SD's training schedule (scaled_linear 0.00085..0.012, T = 1000) with the DDIM sampler SD ships with.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_sd_pipeline(arch: Arch = TINY, seed: int = 0, prediction_type: str = "epsilon", scaling_factor: float = 1.0):
    """A random-init StableDiffusionPipeline of the given architecture (tests; the toy pretraining start)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, arch)).eval()
    vae = build_vae(arch, scaling_factor)
    unet = build_unet(arch)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl_pipeline(arch: Arch = TINY, seed: int = 0, prediction_type: str = "epsilon"):
    """A random-init StableDiffusionXLPipeline: two text encoders, pooled embeddings, size/crop time ids."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, arch)).eval()
    projection_dim = arch.text_hidden
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, arch, projection_dim)).eval()
    unet = build_unet(arch, cross_attention_dim=2 * arch.text_hidden, sdxl=True, text_embeds_dim=projection_dim)
    return StableDiffusionXLPipeline(
        vae=build_vae(arch),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipelines(root: str | Path) -> dict[str, Path]:
    """Save tiny SD (epsilon and v) and SDXL pipelines under `root`; used by tests and benchmarks."""
    root = Path(root)
    out = {}
    for name, build in (
        ("sd", lambda: build_sd_pipeline()),
        ("sd-v", lambda: build_sd_pipeline(prediction_type="v_prediction")),
        ("sdxl", lambda: build_sdxl_pipeline()),
    ):
        build().save_pretrained(root / name)
        out[name] = root / name
    return out
