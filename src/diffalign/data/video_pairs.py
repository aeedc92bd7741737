"""Preference pairs of videos (for the `cogvideox` family): a small, explicit source for DPO / MaPO / NPO.

There is no Pick-a-Pic of videos to mirror, so the format is the image one with clips in place of images:
a parquet file (or a glob / a folder of parquet files) with the columns

    caption            the prompt                                     (config: caption_column)
    video_0, video_1   the two clips                                  (config: image_columns)
    label_0, label_1   1 = preferred, 0 = not, 0.5 / 0.5 = a tie      (config: label_columns)

A clip is either the bytes of a `.npy` file holding uint8 frames `(F, H, W, 3)` (`np.save` into a BytesIO),
or a path (absolute, or relative to the parquet file) to such a `.npy` file or to a folder of frame images,
read in name order. Every clip is cut to its first `num_frames` frames (the model's native count unless
given; CogVideoX needs 4k+1), resized to cover the training size and centre-cropped; a random horizontal
flip, when asked, flips winner and loser together. Ties are dropped (or stop the run with `ties: error`);
rows whose clips cannot be read or are too short are skipped and counted (or stop the run with
`strict_data: true`). The table is read into memory: keep clips as paths for anything but small sets.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .transforms import deterministic_rng

if TYPE_CHECKING:
    from ..models import ModelFamily

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NPY_MAGIC = b"\x93NUMPY"


def _parquet_files(name: str) -> list[Path]:
    p = Path(name).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
    elif any(c in name for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(os.path.expanduser(name)))]
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise UserError(f"video pairs {name!r}: no parquet file found; give a .parquet file, a glob or a folder of "
                        "them (columns caption, video_0, video_1, label_0, label_1: see diffalign.data.video_pairs)")
    return files


def decode_clip(value: Any, root: Path) -> np.ndarray:
    """uint8 frames (F, H, W, 3) from npy bytes, a .npy path or a folder of frame images; ValueError if unreadable."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        if not value.startswith(NPY_MAGIC):  # a binary column also holds paths when parquet mixed the two
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("clip bytes are neither a .npy file nor a path") from None
    if isinstance(value, bytes):
        arr = np.load(io.BytesIO(value), allow_pickle=False)
    elif isinstance(value, str) and value:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            from PIL import Image

            names = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
            if not names:
                raise ValueError(f"no frame images in {path}")
            arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in names])
        elif path.is_file():
            arr = np.load(path, allow_pickle=False)
        else:
            raise ValueError(f"{path} does not exist")
    else:
        raise ValueError(f"a clip must be npy bytes or a path, got {type(value).__name__}")
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"a clip must be uint8 frames (F, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


class VideoPairs:
    """Validated rows (caption, winner clip, loser clip) of a video preference table, with skip/tie counts."""

    def __init__(self, name: str, *, caption_column: str = "caption", video_columns=("video_0", "video_1"),
                 label_columns=("label_0", "label_1"), ties: str = "drop", strict: bool = False,
                 max_samples: int | None = None):
        import pyarrow.parquet as pq

        if len(video_columns) != 2 or len(label_columns) != 2:
            raise UserError(f"video pairs need two clip and two label columns, got {list(video_columns)} and "
                            f"{list(label_columns)}")
        self.name, self.strict = name, strict
        self.counts = {"rows": 0, "ties_dropped": 0, "skipped": 0}
        self.rows: list[tuple[str, Any, Any, Path]] = []
        wanted = [caption_column, *video_columns, *label_columns]
        for file in _parquet_files(name):
            table = pq.read_table(file)
            missing = [c for c in wanted if c not in table.column_names]
            if missing:
                raise UserError(f"{file} has no column(s) {missing}; it has {table.column_names} (set caption_column, "
                                "image_columns and label_columns to the names of the caption, clips and labels)")
            for row in table.select(wanted).to_pylist():
                self.counts["rows"] += 1
                self._add(row, wanted, file.parent, ties)
        if max_samples is not None:
            self.rows = self.rows[: int(max_samples)]

    def _add(self, row: dict, cols: list[str], root: Path, ties: str) -> None:
        caption, v0, v1, l0, l1 = (row[c] for c in cols)
        where = f"{self.name!r} row {self.counts['rows'] - 1}"
        if not isinstance(caption, str) or not isinstance(l0, (int, float)) or not isinstance(l1, (int, float)):
            return self._skip(f"{where}: needs a text caption and numeric labels")
        if l0 == l1:
            if ties == "error":
                raise UserError(f"{where} is a tie ({l0}/{l1}); set ties: drop to leave ties out")
            self.counts["ties_dropped"] += 1
            return
        win, lose = (v0, v1) if l0 > l1 else (v1, v0)
        self.rows.append((caption, win, lose, root))

    def _skip(self, why: str) -> None:
        if self.strict:
            raise UserError(f"{why} (strict_data is on)")
        self.counts["skipped"] += 1

    def __len__(self) -> int:
        return len(self.rows)

    def clips(self, i: int) -> tuple[str, np.ndarray, np.ndarray] | None:
        caption, win, lose, root = self.rows[i]
        try:
            return caption, decode_clip(win, root), decode_clip(lose, root)
        except (ValueError, OSError) as exc:
            self._skip(f"{self.name!r} pair {i}: {exc}")
            return None

    def report(self) -> dict[str, int]:
        return {**self.counts, "pairs": len(self.rows)}

    def summary(self) -> str:
        c = self.counts
        return (f"{len(self.rows)} video pairs from {self.name!r} ({c['rows']} rows, {c['ties_dropped']} ties dropped, "
                f"{c['skipped']} skipped)")


def clip_to_tensor(frames: np.ndarray, num_frames: int, height: int, width: int, flip: bool) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (num_frames, 3, height, width) in [-1, 1]: first frames, cover-resize, centre crop."""
    if frames.shape[0] < num_frames:
        raise ValueError(f"the clip has {frames.shape[0]} frames, fewer than the {num_frames} needed")
    x = torch.from_numpy(np.ascontiguousarray(frames[:num_frames])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x.flip(-1) if flip else x).clamp(-1, 1).contiguous()


class VideoPairItems:
    """Items for the training loop's BatchStream: winner/loser pixels (F, 3, H, W) of one pair, seeded flips."""

    def __init__(self, pairs: VideoPairs, *, num_frames: int, height: int, width: int, random_flip: bool, seed: int):
        self.pairs, self.num_frames, self.size = pairs, num_frames, (height, width)
        self.random_flip, self.seed = random_flip, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def item(self, i: int, epoch: int) -> dict | None:
        got = self.pairs.clips(i)
        if got is None:
            return None
        caption, win, lose = got
        flip = self.random_flip and deterministic_rng(self.seed, epoch, i).random() < 0.5
        try:
            w, l = (clip_to_tensor(c, self.num_frames, *self.size, flip) for c in (win, lose))
        except ValueError as exc:
            self.pairs._skip(f"{self.pairs.name!r} pair {i}: {exc}")
            return None
        h, wd = self.size
        # The size/crop keys the image batches carry (SDXL time ids); video families ignore them.
        return {"caption": caption, "pixel_w": w, "pixel_l": l, "original_size_w": (h, wd), "original_size_l": (h, wd),
                "crop_top_left_w": (0, 0), "crop_top_left_l": (0, 0)}


def load_video_pairs(cfg, family: ModelFamily) -> tuple[VideoPairs, VideoPairItems]:
    """The training loop's (pairs, items) for a video family, from a TrainConfig."""
    if cfg.use_cache is True:
        raise UserError("use_cache is not supported for video pairs yet; set use_cache: false")
    pairs = VideoPairs(cfg.dataset_name, caption_column=cfg.caption_column, video_columns=tuple(cfg.image_columns),
                       label_columns=tuple(cfg.label_columns), ties=cfg.ties, strict=cfg.strict_data,
                       max_samples=cfg.max_train_samples)
    height, width = (cfg.resolution, cfg.resolution) if cfg.resolution else (family.height, family.width)
    family.latent_frames(family.num_frames)  # a clear error for an impossible frame count, before any data is read
    items = VideoPairItems(pairs, num_frames=family.num_frames, height=height, width=width,
                           random_flip=cfg.random_flip, seed=cfg.seed)
    return pairs, items


__all__ = ["VideoPairItems", "VideoPairs", "clip_to_tensor", "decode_clip", "load_video_pairs"]
