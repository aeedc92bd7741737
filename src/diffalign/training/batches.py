"""Deterministic batches for training: data order, augmentation and encoding as functions of (seed, step).

The order of epoch e is a permutation drawn from `seed + e`; process r of w takes every w-th index, so the
global batch is the same whatever the number of processes. Resuming at step k skips straight to the right
position without loading the skipped data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..data import deterministic_rng
from ..data.pairs import is_skipped
from ..data.prefetch import Prefetching
from ..models import Conditioning

if TYPE_CHECKING:
    from ..models import ModelFamily


@dataclass
class PairBatch:
    """Latents of winners and losers [B, ...] and their conditioning (SDXL: time ids per image)."""

    latents_w: Tensor
    latents_l: Tensor
    cond_w: Conditioning
    cond_l: Conditioning

    @property
    def size(self) -> int:
        return self.latents_w.shape[0]


class BatchStream(Prefetching):
    """Yields lists of dataset items for micro-batch number m = 0, 1, 2, ... of this process.

    ``workers > 0`` (``dataloader_num_workers``): that many threads decode and augment the next micro-batches
    while the current one trains (image decoding and resizing release the GIL). An item is a pure function of
    (seed, epoch, row), so the batches, and the weights, are the same with any number of workers.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, workers: int = 0):
        if len(dataset) < batch_size * world:
            raise ValueError(f"the dataset has {len(dataset)} usable rows, fewer than one global batch "
                             f"({batch_size} x {world} processes)")
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.per_epoch = len(dataset) // (batch_size * world)  # incomplete last batches are dropped
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation): drawn once per epoch
        self._start_prefetch(workers, "diffalign-data")

    def indices(self, micro: int) -> tuple[list[int], int]:
        """This process's dataset rows for micro-batch `micro`, and the epoch they belong to."""
        epoch, pos = divmod(micro, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.dataset), generator=gen).tolist())
        order = self._order[1]
        global_batch = order[pos * self.batch_size * self.world : (pos + 1) * self.batch_size * self.world]
        return global_batch[self.rank :: self.world], epoch

    def _load(self, idx: list[int], epoch: int) -> list:
        return [self.dataset.item(i, epoch) for i in idx]


class PixelPairs:
    """Pairs decoded and augmented on the fly; augmentation is seeded by (seed, epoch, row)."""

    def __init__(self, pairs, transform, seed: int):
        self.pairs, self.transform, self.seed = pairs, transform, seed
        self._counted: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def item(self, i: int, epoch: int):
        raw = self.pairs[i]
        if is_skipped(raw):
            # An image that fails to decode is counted once (in the run's data report), then left out.
            if i not in self._counted:
                self._counted.add(i)
                self.pairs.record_skipped([raw])
            return None
        return self.transform(raw, deterministic_rng(self.seed, epoch, i))


class CachedItems:
    """Items of a latent cache (encoded centre-cropped). With `flip_seed` (a cache built with flipped views, for
    `random_flip`) each pair takes its flipped view exactly when the pixel path would flip it: the first draw of
    `deterministic_rng(seed, epoch, index)`, index being the pair's position in the data, as `PairTransform` draws."""

    def __init__(self, cached, flip_seed: int | None = None):
        self.cached, self.flip_seed = cached, flip_seed

    def __len__(self) -> int:
        return len(self.cached)

    def item(self, i: int, epoch: int):
        item = self.cached[i]
        if self.flip_seed is None:
            return item
        flip = deterministic_rng(self.flip_seed, epoch, item["index"]).random() < 0.5
        views = {k: item.pop(k) for k in [k for k in item if k.endswith("_flip")]}
        if not views:
            raise ValueError("random_flip from a cache needs a cache built with flipped views (flips=True)")
        if flip:
            item.update({k[: -len("_flip")]: v for k, v in views.items()})
        item["flipped"] = flip
        return item


def empty_prompt_mask(p: float, n: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> list[bool]:
    """Caption dropout (``proportion_empty_prompts``): which of this process's ``n`` rows of a micro-batch train on
    the empty prompt "".

    Row k of the GLOBAL micro-batch (``world x n`` rows) is dropped when its draw ``u_k ~ U[0, 1)`` (float64) is
    below ``p``; the draw comes from the loop's per-step generator, the same on every process, and this process
    keeps rows ``rank::world``, the rows ``BatchStream`` gives it. So the dropped samples are a function of
    (seed, step, micro-batch, position) only: a resumed run and any number of processes drop the same ones.
    ``p == 0`` draws nothing and leaves the generator as it was, so such a run is unchanged.
    """
    if p <= 0:
        return [False] * n
    rank, world = shard
    u = torch.rand(n * world, generator=generator, dtype=torch.float64)[rank::world]
    return (u < p).tolist()


def drop_captions(items: list, mask: list[bool], empty: dict | None = None) -> tuple[list, int]:
    """``items`` with the rows ``mask`` marks given the empty prompt, and how many usable rows that changed.

    A pair has one caption, so winner and loser both get "". A pixel item's caption becomes "" (encoded with the
    rest of the batch); a cached item has no text to encode and takes ``empty``, the cached form of the encoded ""
    (``diffalign.data.cache.cached_text(family, [""])`` without its batch dimension), in place of its own
    ``prompt_embeds`` (and SDXL ``text_embeds``). Items are copied, never changed in place; ``None`` rows (images
    that failed to decode) stay ``None`` and are not counted.
    """
    if len(mask) != len(items):
        raise ValueError(f"the caption-dropout mask has {len(mask)} rows for {len(items)} items")
    out, dropped = [], 0
    for item, drop in zip(items, mask):
        if drop and item is not None:
            item = {**item, "caption": ""}
            if "prompt_embeds" in item:
                if empty is None:
                    raise ValueError("cached items need the empty prompt's cached embeddings to drop a caption")
                item.update(empty)
            dropped += 1
        out.append(item)
    return out, dropped


def to_pair_batch(items: list, family: ModelFamily, resolution: int, device) -> PairBatch | None:
    """Encode a list of items (pixels or cached latents) into a PairBatch; None if every item was bad."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    if "latents_w" in items[0]:
        stack = lambda key: torch.stack([it[key] for it in items]).to(device)
        cond_w = Conditioning(stack("prompt_embeds"),
                              stack("text_embeds") if "text_embeds" in items[0] else None,
                              stack("time_ids_w") if "time_ids_w" in items[0] else None)
        cond_l = cond_w.replace(time_ids=stack("time_ids_l")) if "time_ids_l" in items[0] else cond_w
        return PairBatch(stack("latents_w").to(family.dtype), stack("latents_l").to(family.dtype), cond_w, cond_l)
    pixels_w = torch.stack([it["pixel_w"] for it in items]).to(device)
    pixels_l = torch.stack([it["pixel_l"] for it in items]).to(device)
    captions = [it["caption"] for it in items]
    with torch.no_grad():
        latents = family.encode_images(torch.cat([pixels_w, pixels_l]))
        cond_w = family.encode_prompts(captions)
    size = (resolution, resolution)
    time_w = family.time_ids([it["original_size_w"] for it in items], [it["crop_top_left_w"] for it in items], size)
    if time_w is not None:
        time_l = family.time_ids([it["original_size_l"] for it in items], [it["crop_top_left_l"] for it in items], size)
        cond_l = cond_w.replace(time_ids=time_l.to(device))
        cond_w = cond_w.replace(time_ids=time_w.to(device))
    else:
        cond_l = cond_w
    lat_w, lat_l = latents.chunk(2)
    return PairBatch(lat_w, lat_l, cond_w, cond_l)
