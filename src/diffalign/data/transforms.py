"""Joint augmentation of a preference pair, reproducible per (seed, epoch, index), and batch collation.

The two images of a Pick-a-Pic pair often differ in size (SDXL-beta vs Dreamlike renders). Each image is resized
on its own - shorter side to `resolution`, aspect ratio kept - and then cropped square; one image is never
stretched to the other's size. A pair shares ONE flip decision and ONE crop position, the position being
relative (the same fraction of each image's free margin), so winner and loser show the same part of the scene
whatever their sizes. Flipping winner and loser independently, or stretching one to the other, are known
defects of older scripts (docs/methods.md#conventions-shared-by-every-method).

SDXL micro-conditioning needs, per image, the size before resizing (`original_size_*`, (h, w)) and where the
crop starts in the resized image (`crop_top_left_*`, (top, left)). After a horizontal flip the crop's left edge
is given in the flipped image (`resized_w - left - resolution`), i.e. for the picture the model actually sees.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .pairs import SkippedPair, is_skipped

_SIZE_KEYS = ("original_size_w", "original_size_l", "crop_top_left_w", "crop_top_left_l")


def deterministic_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A `random.Random` fixed by (seed, epoch, index): same augmentation after a resume, in any worker."""
    key = hashlib.sha256(f"diffalign-aug:{int(seed)}:{int(epoch)}:{int(index)}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "little"))


def to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class PairTransform:
    """Resize each image (shorter side -> `resolution`), crop square jointly, flip jointly, make tensors.

    `center_crop=False` draws one relative crop position per pair; `random_flip` flips both images with
    probability 1/2. All randomness comes from the `rng` passed to `__call__`, in a fixed order (flip, then crop
    top, then crop left), so the same rng state gives the same output.
    """

    def __init__(self, resolution: int, *, random_flip: bool = True, center_crop: bool = False):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self.center_crop = bool(center_crop)

    def __repr__(self) -> str:
        return f"PairTransform({self.resolution}, random_flip={self.random_flip}, center_crop={self.center_crop})"

    def _resize(self, image):
        from PIL import Image

        size = self._resize_size(image)
        return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)

    def _offset(self, free: int, u: float | None) -> int:
        if u is None:  # centre, rounded as torchvision's CenterCrop does
            return int(round(free / 2.0))
        return min(int(u * (free + 1)), free)

    def _one(self, image, flip: bool, u: float | None, v: float | None):
        from PIL import Image

        original = (image.size[1], image.size[0])
        image = self._resize(image)
        width, height = image.size
        res = self.resolution
        top, left = self._offset(height - res, u), self._offset(width - res, v)
        image = image.crop((left, top, left + res, top + res))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = width - left - res
        return to_tensor(image), original, (top, left)

    def crop_room(self, image) -> tuple[int, int]:
        """(rows, columns) a crop of `image` (resized) can move by: (0, 0) when every crop position is the same."""
        width, height = self._resize_size(image)
        return height - self.resolution, width - self.resolution

    def view(self, item: dict, *, flip: bool) -> dict:
        """The centre-cropped view of a pair, flipped or not: what `__call__` gives for that flip draw when the crop
        is fixed (`center_crop`, or images whose crop has no room)."""
        return self._apply(item, flip, None, None)

    def _resize_size(self, image) -> tuple[int, int]:
        w, h = image.size
        res = self.resolution
        return (res, max(res, round(h * res / w))) if w <= h else (max(res, round(w * res / h)), res)

    def __call__(self, item: dict | SkippedPair | None, rng: random.Random) -> dict | SkippedPair | None:
        if is_skipped(item):
            return item
        flip = self.random_flip and rng.random() < 0.5
        u, v = (None, None) if self.center_crop else (rng.random(), rng.random())
        return self._apply(item, flip, u, v)

    def _apply(self, item: dict, flip: bool, u: float | None, v: float | None) -> dict:
        out = {k: val for k, val in item.items() if k not in ("image_w", "image_l")}
        for side in ("w", "l"):
            pixels, original, crop = self._one(item[f"image_{side}"], flip, u, v)
            out[f"pixel_{side}"] = pixels
            out[f"original_size_{side}"] = original
            out[f"crop_top_left_{side}"] = crop
        out["flipped"] = flip
        return out


class TransformedPairs(Dataset):
    """`pairs[i]` augmented with `deterministic_rng(seed, epoch, i)`; call `set_epoch` before each epoch.

    With `persistent_workers=True` DataLoader workers keep their own copy and miss `set_epoch`: leave it off, or
    the augmentation repeats each epoch.
    """

    def __init__(self, pairs, transform: PairTransform, seed: int = 0):
        self.pairs, self.transform, self.seed, self.epoch = pairs, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return self.transform(self.pairs[index], deterministic_rng(self.seed, self.epoch, index))

    def __getattr__(self, name: str):
        # report(), summary(), record_skipped() ... of the wrapped pairs
        if name == "pairs":
            raise AttributeError(name)
        return getattr(self.pairs, name)


def collate_pairs(items: Sequence[Any]) -> dict:
    """Stack a list of items into a batch, dropping skipped ones (None / `SkippedPair`).

    Tensors are stacked, `index`/`row` become int64 tensors, sizes and crops stay lists of (h, w) / (top, left)
    tuples (what `family.time_ids` takes), everything else (captions, PIL images) is listed. `batch["skipped"]`
    lists the dropped `SkippedPair`s and `batch["num_dropped"]` counts every dropped item. When every item was
    dropped the batch has only `index` (empty), `caption` ([]), `skipped` and `num_dropped`: skip that step.
    """
    kept = [it for it in items if not is_skipped(it)]
    batch: dict[str, Any] = {
        "skipped": [it for it in items if isinstance(it, SkippedPair)],
        "num_dropped": len(items) - len(kept),
    }
    if not kept:
        batch.update(index=torch.empty(0, dtype=torch.long), caption=[])
        return batch
    for key in kept[0]:
        values = [it[key] for it in kept]
        if key in ("index", "row"):
            batch[key] = torch.as_tensor([int(v) for v in values], dtype=torch.long)
        elif key in _SIZE_KEYS:
            batch[key] = [tuple(int(x) for x in v) for v in values]
        elif all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif key == "flipped":
            batch[key] = torch.as_tensor(values, dtype=torch.bool)
        else:
            batch[key] = values
    return batch


class PairCollator:
    """`collate_pairs` that also keeps a running count of dropped items (per process: in the main process with
    num_workers=0; with workers, read `batch["num_dropped"]` / `batch["skipped"]` instead)."""

    def __init__(self):
        self.num_dropped = 0

    def __call__(self, items: Sequence[Any]) -> dict:
        batch = collate_pairs(items)
        self.num_dropped += batch["num_dropped"]
        return batch
