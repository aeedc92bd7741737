"""A tiny random-init CogVideoX pipeline, built offline from code (tests of the `cogvideox` family).

Every component is the real diffusers/transformers class at toy size - `CogVideoXTransformer3DModel`,
`AutoencoderKLCogVideoX` (8x spatial and 4x temporal compression, like the real VAE), `T5EncoderModel` and a
`T5Tokenizer`, `CogVideoXDDIMScheduler` with v-prediction, the SNR shift and zero terminal SNR - so a saved
folder loads with `CogVideoXPipeline.from_pretrained` and every CogVideoX code path runs for real.

Two variants mirror the released checkpoints' differences that matter to the code:
- "2b": sinusoidal positional embeddings, `snr_shift_scale` 3.0 (THUDM/CogVideoX-2b);
- "5b": rotary positional embeddings, `snr_shift_scale` 1.0 (THUDM/CogVideoX-5b).

The tokenizer is a Unigram model over the toy world's words plus single letters, so any lower-case prompt
tokenizes (unknown words letter by letter) and "" gives just the end-of-sequence token, as T5 does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.toy.world import WORDS

VARIANTS = ("2b", "5b")
#: Pixels of the tiny model's native clip: 9 frames of 16x32 (latents 3 x 16 x 2 x 4, the real layout
#: (F', C, H/8, W/8) at the smallest size a 2x2 patch allows; non-square like the real 480x720). 9 = 8k+1 like
#: the real 49: the VAE decoder turns an odd F' back into 4F'-3 frames, an even one into 4F' (not a clip).
TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH = 9, 16, 32
TEXT_DIM = 32
#: The stock pipeline's T5 length (`max_sequence_length=226`): the family must encode prompts the same way.
TEXT_LENGTH = 226


def build_t5_tokenizer():
    """A T5Tokenizer (tokenizers backend) whose vocabulary is built here, no download, no sentencepiece."""
    from transformers import T5Tokenizer

    meta = "\u2581"  # SentencePiece's word-start mark, which the T5 pre-tokenizer inserts
    words = sorted({w for w in WORDS if w.isalpha()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(meta + w, -1.0) for w in words]
    # Single pieces so every other word still tokenizes (letter by letter, at a much lower score).
    vocab += [(meta, -3.0), (",", -3.0)] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (CogVideoX uses t5-v1_1-xxl)
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def build_video_vae(latent_channels: int = 16, scaling_factor: float = 1.15258426):
    from diffusers import AutoencoderKLCogVideoX

    # Four blocks as in the real VAE: three spatial downsamples (8x), the first two also temporal (4x).
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=TINY_HEIGHT,
        sample_width=TINY_WIDTH,
        scaling_factor=scaling_factor,
    )


def build_video_transformer(variant: str = "2b", in_channels: int = 16):
    from diffusers import CogVideoXTransformer3DModel

    rotary = variant == "5b"
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # rotary splits it 4/6/6 over (t, h, w): each part must be even
        in_channels=in_channels,
        out_channels=in_channels,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=TINY_WIDTH // 8,
        sample_height=TINY_HEIGHT // 8,
        sample_frames=TINY_FRAMES,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LENGTH,
        use_rotary_positional_embeddings=rotary,
    )


def build_video_scheduler(variant: str = "2b"):
    from diffusers import CogVideoXDDIMScheduler

    # The released CogVideoX scheduler configs: v-prediction, zero terminal SNR, trailing spacing; the SNR
    # shift is 3.0 for 2b and 1.0 for 5b.
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=3.0 if variant == "2b" else 1.0,
    )


def build_cogvideox_pipeline(variant: str = "2b", seed: int = 0):
    """A random-init `CogVideoXPipeline` (variant '2b' or '5b', see the module docstring)."""
    from diffusers import CogVideoXPipeline

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer)),
        vae=build_video_vae(scaling_factor=1.15258426 if variant == "2b" else 0.7),
        transformer=build_video_transformer(variant),
        scheduler=build_video_scheduler(variant),
    )


def save_tiny_cogvideox(root: str | Path, variants=VARIANTS) -> dict[str, Path]:
    """Save tiny CogVideoX pipelines as `root/cogvideox-<variant>` folders; returns {variant: path}."""
    root = Path(root)
    out = {}
    for variant in variants:
        path = root / f"cogvideox-{variant}"
        build_cogvideox_pipeline(variant).save_pretrained(path)
        out[variant] = path
    return out


__all__ = [
    "TINY_FRAMES",
    "TINY_HEIGHT",
    "TINY_WIDTH",
    "VARIANTS",
    "build_cogvideox_pipeline",
    "build_t5_tokenizer",
    "build_text_encoder",
    "build_video_scheduler",
    "build_video_transformer",
    "build_video_vae",
    "save_tiny_cogvideox",
]
