"""Checks of the keys of pushing to the hub (push_to_hub, hub_model_id, hub_push_checkpoints) and of streaming
(streaming, shuffle_buffer_size, data_files), run by ``TrainConfig.validate``: cheap and offline, no import of
huggingface_hub or datasets."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

STREAMING_METHODS = ("dpo", "mapo", "npo", "sft")  # the pair methods, which read preference rows


def default_hub_model_id(cfg) -> str:
    """hub_model_id, or the name of output_dir (under the account of the token), as the diffusers scripts do."""
    return cfg.hub_model_id or Path(str(cfg.output_dir)).resolve().name


def check_hub_and_streaming(cfg) -> None:
    if cfg.hub_push_checkpoints and not cfg.push_to_hub:
        raise UserError("hub_push_checkpoints=true needs push_to_hub=true (it uploads each checkpoint's weights to "
                        "the run's hub repo): set --push_to_hub=true or remove it")
    if cfg.hub_model_id is not None and not cfg.push_to_hub:
        raise UserError(f"hub_model_id={cfg.hub_model_id} is only read with push_to_hub=true: set --push_to_hub=true "
                        "or remove it")
    if cfg.push_to_hub:
        repo = default_hub_model_id(cfg)
        parts = repo.split("/")
        if len(parts) > 2 or not all(parts) or any(p in (".", "..") for p in parts) or " " in repo:
            raise UserError(f"hub_model_id '{repo}' is not a hub repo id: give 'name' or 'namespace/name'")
    if cfg.shuffle_buffer_size < 0:
        raise UserError(f"shuffle_buffer_size must be >= 0 (0: stream order), got {cfg.shuffle_buffer_size}")
    if any(not str(p).strip() for p in cfg.data_files):
        raise UserError("data_files has an empty pattern")
    if not cfg.streaming:
        return
    if cfg.method not in STREAMING_METHODS:
        raise UserError(f"streaming=true reads preference pairs (method={'/'.join(STREAMING_METHODS)}); "
                        f"method={cfg.method} loads its data whole: set --streaming=false")
    if cfg.use_cache is True:
        raise UserError("streaming=true cannot build a latent cache (use_cache needs every row up front): set "
                        "--use_cache=false, or --streaming=false with max_train_samples to cache a part")
