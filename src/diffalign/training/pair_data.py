"""The data of the pair methods (dpo, mapo, npo, sft): preference pairs as pixels, from the latent cache, or as
video clips, and what caption dropout puts in place of a cached caption."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data import PairTransform, build_cache, fingerprint, load_pairs, open_cache
from ..data.cache import RandomCropNotCacheable, cached_text, record_manifest_skips
from ..data.pairs import SkippedPair
from ..data.streaming import StreamingPairs, StreamItems
from ..data.video_pairs import load_video_pairs
from ..errors import UserError
from .batches import CachedItems, PixelPairs

if TYPE_CHECKING:
    from ..models import ModelFamily


def load_config_pairs(cfg):
    """The preference pairs a config trains on: one call for `diffalign train` and `diffalign cache`, so a cache
    built ahead of time has the fingerprint the run looks for (every data key is part of it)."""
    return load_pairs(cfg.dataset_name, split=cfg.dataset_split_name, caption_column=cfg.caption_column,
                      image_columns=tuple(cfg.image_columns), label_columns=tuple(cfg.label_columns), ties=cfg.ties,
                      strict=cfg.strict_data, max_samples=cfg.max_train_samples, min_size=cfg.min_image_size or 0,
                      image_root=cfg.image_root, **({"data_files": tuple(cfg.data_files)} if cfg.data_files else {}))


def open_streaming_pairs(cfg) -> StreamingPairs:
    """The preference pairs of a config with streaming=true: the same keys as :func:`load_config_pairs`."""
    return StreamingPairs(cfg.dataset_name, split=cfg.dataset_split_name, data_files=tuple(cfg.data_files),
                          caption_column=cfg.caption_column, image_columns=tuple(cfg.image_columns),
                          label_columns=tuple(cfg.label_columns), ties=cfg.ties, strict=cfg.strict_data,
                          max_samples=cfg.max_train_samples, min_size=cfg.min_image_size or 0, seed=cfg.seed,
                          shuffle_buffer_size=cfg.shuffle_buffer_size, image_root=cfg.image_root)


def load_pair_items(cfg, family: ModelFamily, resolution: int, log):
    """(pairs, items for the BatchStream): decoded and augmented pixels, the latent cache (built when missing),
    or clips for a video family."""
    if family.is_video:  # pairs of clips (CogVideoX, issue 10): see data/video_pairs.py
        if cfg.streaming:
            raise UserError(f"streaming=true reads image pairs; {family.name} trains on clips, read whole: set "
                            "--streaming=false")
        return load_video_pairs(cfg, family)
    if cfg.streaming:  # read as a stream, validated chunk by chunk (data/streaming.py)
        pairs = open_streaming_pairs(cfg)
        transform = PairTransform(resolution, random_flip=cfg.random_flip, center_crop=cfg.center_crop)
        order = f"shuffle buffer {cfg.shuffle_buffer_size}" if cfg.shuffle_buffer_size else "stream order"
        log(f"streaming {pairs.description} ({order})")
        return pairs, StreamItems(pairs, transform, cfg.seed)
    pairs = load_config_pairs(cfg)
    transform = PairTransform(resolution, random_flip=cfg.random_flip, center_crop=cfg.center_crop)
    if cfg.use_cache is True:
        cached = _open_or_build(cfg, pairs, family, resolution, log)
        log(f"using the latent cache in {cached.cache_dir} ({len(cached)} pairs; no random flips when cached)")
        return pairs, CachedItems(cached)
    if cfg.use_cache == "auto":
        why = auto_cache_refusal(cfg)
        if why is None:
            try:
                cached = _open_or_build(cfg, pairs, family, resolution, log, flips=cfg.random_flip,
                                        require_fixed_crop=not cfg.center_crop)
            except RandomCropNotCacheable as exc:
                why = f"random crops (center_crop: false) cannot be cached: {exc}"
            else:
                flips = " with the flipped view of every pair (random_flip)" if cfg.random_flip else ""
                log(f"use_cache=auto: training from the latent cache in {cached.cache_dir} ({len(cached)} pairs{flips})")
                return pairs, CachedItems(cached, flip_seed=cfg.seed if cfg.random_flip else None)
        log(f"use_cache=auto: training on pixels, not from a latent cache: {why}")
    return pairs, PixelPairs(pairs, transform, cfg.seed)


def auto_cache_refusal(cfg) -> str | None:
    """Why `use_cache: auto` cannot cache this config's data before looking at it (None: it can try)."""
    if cfg.streaming:
        return "the data is streamed"
    if not Path(str(cfg.dataset_name)).expanduser().exists():
        return f"{cfg.dataset_name!r} is not a local dataset"
    return None


def _open_or_build(cfg, pairs, family: ModelFamily, resolution: int, log, *, flips: bool = False,
                   require_fixed_crop: bool = False):
    cache_dir = Path(cfg.cache_dir or Path(cfg.output_dir) / "cache")
    key = fingerprint(pairs, family, resolution=resolution, flips=flips)
    cached = open_cache(cache_dir, key)
    if cached is not None:  # reused: its skipped pairs still count
        record_manifest_skips(pairs, cached.manifest)
    else:
        log(f"no matching latent cache in {cache_dir}: building it")
        start = time.perf_counter()
        build_cache(pairs, family, resolution=resolution, cache_dir=cache_dir, flips=flips,
                    require_fixed_crop=require_fixed_crop)
        cached = open_cache(cache_dir, key)
        log(f"latent cache built in {time.perf_counter() - start:.1f} s ({len(cached)} pairs"
            f"{', two views each' if flips else ''})")
    check_cache_skips(cached, cfg.max_skipped_share)
    return cached


def check_cache_skips(cached, limit: float) -> None:
    """Stop before training when the pairs skipped while the cache was built (their images could not be used)
    reach `max_skipped_share` of the data: the cached path's form of the pixel path's fetch guard."""
    skipped = cached.manifest.get("skipped", [])
    total = len(skipped) + len(cached)
    if not skipped or len(skipped) < limit * total:
        return
    reasons = Counter(SkippedPair(*s).reason for s in skipped)
    shown = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
    raise UserError(f"{len(skipped)} of the {total} pairs had images that could not be used when the latent cache was "
                    f"built ({shown}; listed under 'skipped' in {Path(cached.cache_dir) / 'manifest.json'}), at least "
                    f"max_skipped_share={limit:g} of them, so training did not start; fix the images, or raise "
                    "max_skipped_share to accept more skipped rows")


def empty_prompt(cfg, family: ModelFamily, items) -> dict | None:
    """What caption dropout puts in place of a cached pair's embeddings: the encoded "" as the cache stores text
    (None when nothing is dropped, or when items carry captions that are encoded with their batch)."""
    if not cfg.proportion_empty_prompts or not isinstance(items, CachedItems):
        return None

    with torch.no_grad():
        return {k: v[0] for k, v in cached_text(family, [""]).items()}


__all__ = ["auto_cache_refusal", "empty_prompt", "load_config_pairs", "load_pair_items", "open_streaming_pairs"]
