"""Tiny random-init SD3 and FLUX pipelines, built offline from code (tests of the `sd3` and `flux` families).

Every component is the real diffusers/transformers class at toy size - `SD3Transformer2DModel` /
`FluxTransformer2DModel`, `AutoencoderKL` with the real models' shift and scaling factors, CLIP text encoders
(with the toy tokenizer's real end-of-text id, where CLIP pools) and a T5 encoder with the toy T5 tokenizer,
`FlowMatchEulerDiscreteScheduler` with SD3.5's shift 3.0 or FLUX's dynamic shifting - so a saved folder loads
with `StableDiffusion3Pipeline` / `FluxPipeline.from_pretrained` and every code path runs for real.

FLUX comes as "dev" (a guidance-embedding transformer, like FLUX.1-dev) and "schnell" (without).
"""

from __future__ import annotations

from pathlib import Path

import torch
from video_builders import build_t5_tokenizer

from diffalign.toy.builders import TINY, _text_config, _tokenizer

SIZE = 32  # pixels of the tiny models' images (latents 4 x 16 x 16: VAE factor 2)
T5_DIM = 64
CLIP_DIM = 32


def _t5(vocab_size: int, d_model: int = T5_DIM):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                   is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)).eval()


def _vae(scaling_factor: float, shift_factor: float, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=SIZE,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, mid_block_add_attention=False,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_sd3_pipeline(seed: int = 0):
    """A random-init `StableDiffusion3Pipeline` (SD3.5's VAE factors and scheduler shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok_2, tok_3 = _tokenizer(), _tokenizer(), build_t5_tokenizer()
    enc = CLIPTextModelWithProjection(_text_config(tok, TINY, CLIP_DIM)).eval()
    enc_2 = CLIPTextModelWithProjection(_text_config(tok_2, TINY, CLIP_DIM)).eval()
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_DIM, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(1.5305, 0.0609), text_encoder=enc, tokenizer=tok, text_encoder_2=enc_2, tokenizer_2=tok_2,
        text_encoder_3=_t5(len(tok_3)), tokenizer_3=tok_3)


def build_flux_pipeline(variant: str = "dev", seed: int = 0):
    """A random-init `FluxPipeline`; variant "dev" has guidance embeddings, "schnell" has none."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant must be dev or schnell, got {variant!r}")
    torch.manual_seed(seed)
    tok, tok_2 = _tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM, guidance_embeds=variant == "dev",
        axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(0.3611, 0.1159),
                        text_encoder=CLIPTextModel(_text_config(tok, TINY)).eval(), tokenizer=tok,
                        text_encoder_2=_t5(len(tok_2)), tokenizer_2=tok_2)


def save_tiny_flow_pipelines(root: str | Path) -> dict[str, Path]:
    """Save tiny SD3, FLUX-dev and FLUX-schnell pipelines under `root`: {'sd3', 'flux', 'flux-schnell'}."""
    root = Path(root)
    out = {}
    for name, build in (("sd3", build_sd3_pipeline), ("flux", lambda: build_flux_pipeline("dev")),
                        ("flux-schnell", lambda: build_flux_pipeline("schnell"))):
        build().save_pretrained(root / name)
        out[name] = root / name
    return out


__all__ = ["SIZE", "build_flux_pipeline", "build_sd3_pipeline", "save_tiny_flow_pipelines"]
