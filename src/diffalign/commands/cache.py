"""`diffalign cache CONFIG.yaml [--key=value ...]`: precompute VAE latents and prompt embeddings for a training
config."""

from __future__ import annotations

import time
from pathlib import Path

from .train import train_config


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="precompute VAE latents and prompt embeddings for a training config", allow_abbrev=False)
    p.add_argument("config")
    p.set_defaults(func=cmd, accepts_overrides=True)


def cmd(args) -> int:
    from ..data import build_cache, fingerprint
    from ..models import load_family
    from ..training.pair_data import load_config_pairs

    cfg = train_config(args)
    cfg.validate()
    family = load_family(cfg.pretrained_model_name_or_path,
                         pretrained_vae_model_name_or_path=cfg.pretrained_vae_model_name_or_path)
    pairs = load_config_pairs(cfg)
    resolution = cfg.resolution or family.default_resolution
    cache_dir = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")
    # The cache the run looks for: use_cache=auto with random_flip also holds the flipped view of every pair.
    flips = cfg.use_cache == "auto" and cfg.random_flip
    start = time.perf_counter()
    build_cache(pairs, family, resolution=resolution, cache_dir=cache_dir, flips=flips,
                require_fixed_crop=cfg.use_cache == "auto" and not cfg.center_crop)
    key = fingerprint(pairs, family, resolution=resolution, flips=flips)[:12]
    print(f"cache of {len(pairs)} pairs{' (with flipped views)' if flips else ''} written to {cache_dir} (key {key}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
