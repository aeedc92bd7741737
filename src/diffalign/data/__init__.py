"""Preference data: pairs from hub / save_to_disk / parquet / image folders, joint pair augmentation, latent cache.

Knows nothing about training methods: it yields validated (caption, winner, loser) pairs, augmented tensors
with SDXL size/crop info, and cached latents/embeddings keyed by a fingerprint of data, model and resolution.
"""

from .cache import CachedPairs, build_cache, cache_miss_reason, fingerprint, open_cache
from .pairs import PreferencePairs, SkippedPair, decode_image, is_skipped, load_pairs
from .transforms import PairCollator, PairTransform, TransformedPairs, collate_pairs, deterministic_rng, to_tensor

__all__ = [
    "load_pairs",
    "PreferencePairs",
    "SkippedPair",
    "is_skipped",
    "decode_image",
    "PairTransform",
    "TransformedPairs",
    "deterministic_rng",
    "collate_pairs",
    "PairCollator",
    "to_tensor",
    "build_cache",
    "open_cache",
    "cache_miss_reason",
    "fingerprint",
    "CachedPairs",
]
