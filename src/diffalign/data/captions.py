"""Image-caption rows: real images with their captions, for the ``target`` recipe of ``diffalign pairs`` and for
Self-NPO's image start (``selfnpo_start: images``). One reader, two kinds of source:

- a folder of images with ``captions.jsonl``, one ``{"file_name": ..., "caption": ...}`` a line (the caption key
  is the caption column); the line number is the row shown in messages;
- anything `diffalign.data` reads as a table (parquet file or glob, `save_to_disk` folder, hub id) with an image
  column (encoded bytes, ``{"bytes", "path"}`` or a path) and a caption column.

`usable_rows` decodes every image once, before the model loads: strict mode stops at the first bad row naming
it and the reason, lenient mode leaves it out and counts the reason (missing_caption, bad_caption,
missing_image, undecodable_image). `ImageCaptions` decodes images when fetched instead (a training epoch), and
`ImageCaptionTransform` resizes and crops them deterministically per (seed, epoch, row).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import UserError
from ..safety.paths import confine_image_cell
from .pairs import _BadImage, decode_image  # noqa: PLC2701 - decode_image's own failure type
from .sources import resolve_source
from .transforms import to_tensor

CAPTIONS_FILE = "captions.jsonl"


class CaptionRows:
    """Rows of (image, caption): `len`, `caption(i)`, `image(i)` (raises `_BadImage`), `row(i)` (the row as
    messages name it), `check(i)`, `counts` of the rows left out and their reasons, `description`."""

    description = ""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: Counter = Counter()
        self._captions: list = []
        self._malformed: set[int] = set()  # rows whose captions-file line could not be read

    def __len__(self) -> int:
        return len(self._captions)

    def caption(self, i: int):
        return self._captions[i]

    def row(self, i: int) -> str:
        return f"row {i}"

    def _raw_image(self, i: int):
        raise NotImplementedError

    def image(self, i: int):
        """The RGB PIL image of row i; raises `_BadImage`."""
        return decode_image(self._raw_image(i))

    def check(self, i: int) -> bool:
        """True when row i has a caption and an image that decodes; strict: UserError naming the row."""
        reason, detail = None, ""
        if i in self._malformed:
            reason, detail = "bad_caption", "the line is not a JSON object with a string file_name"
        elif not isinstance(self._captions[i], str):
            reason, detail = "missing_caption", "no string caption"
        else:
            try:
                self.image(i)
            except _BadImage as exc:
                reason, detail = exc.reason, exc.detail
        if reason is None:
            return True
        if self.strict:
            raise UserError(f"{self.description}: {self.row(i)}: {reason}: {detail} (strict_data: true; set it to "
                            "false to skip such rows)")
        self.counts[reason] += 1
        return False


class CaptionFolder(CaptionRows):
    def __init__(self, root: Path, caption_column: str, strict: bool):
        super().__init__(strict)
        self.root = root
        self.description = f"image folder '{root}'"
        self._files: list = []
        lines = (root / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines()
        self._lines: list[int] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            ok = isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
            if not ok:
                self._malformed.add(len(self._files))
            self._files.append(entry["file_name"] if ok else None)
            self._captions.append(entry.get(caption_column) if ok else None)
            self._lines.append(number)

    def row(self, i: int) -> str:
        return f"row {i} ({CAPTIONS_FILE} line {self._lines[i]}, file {self._files[i]!r})"

    def _raw_image(self, i: int):
        return None if self._files[i] is None else self.root / self._files[i]


class CaptionTable(CaptionRows):
    """A table's rows. Image cells holding a file path (not bytes) are read only inside `image_root`."""

    def __init__(self, source, image_column: str, caption_column: str, split: str, strict: bool,
                 keys: tuple[str, str] = ("image_column", "caption_column"), image_root: str | None = None):
        super().__init__(strict)
        src = resolve_source(source, split=split, caption_column=caption_column, strict=strict, cache_dir=None)
        self.description = src.description
        self._image_root, self._image_column = image_root, image_column
        self._confine = src.kind not in ("folder", "memory")  # as the preference pairs: data holding file paths
        columns = src.table.column_names
        for what, key, name in (("image", keys[0], image_column), ("caption", keys[1], caption_column)):
            if name not in columns:
                raise UserError(f"{src.description} has no {what} column {name!r} (columns: {', '.join(columns)}); "
                                f"set {key}")
        self._captions = src.table.column(caption_column)
        src.table.prepare_images([image_column])
        self._table = src.table

    def _raw_image(self, i: int):
        cell = self._table.images(i)[0]
        if self._confine:
            cell = confine_image_cell(cell, self._image_root, f"{self.description}: {self.row(i)}, column "
                                                              f"{self._image_column!r}")
        return cell


def open_captions(source, *, image_column: str, caption_column: str, split: str, strict: bool,
                  keys: tuple[str, str] = ("image_column", "caption_column"),
                  image_root: str | None = None) -> CaptionRows:
    """A caption folder or a table; ``keys`` name the options that set the two columns (for messages)."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and (path / CAPTIONS_FILE).is_file() and not (path / "w").is_dir():
        return CaptionFolder(path, caption_column, strict)
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(f"image-caption source '{source}' is an empty folder: it needs images and {CAPTIONS_FILE}")
    return CaptionTable(source, image_column, caption_column, split, strict, keys, image_root)


def usable_rows(src: CaptionRows, limit: int | None) -> list[int]:
    """The first `limit` rows (all: None) whose caption and image are usable, in source order."""
    rows = []
    for i in tqdm(range(len(src)), desc="check source images", unit="img", leave=False):
        if limit is not None and len(rows) >= limit:
            break
        if src.check(i):
            rows.append(i)
    if not rows:
        raise UserError(f"{src.description} has no usable row (skipped: {dict(src.counts) or 'none'})")
    return rows


class ImageCaptions:
    """The rows of a caption source that have a caption, images decoded when fetched (Self-NPO's image start).

    ``strict=False`` skips rows with a missing caption up front and rows whose image fails to decode when
    fetched (``image`` returns None, counted in ``report()``); ``strict=True`` raises ``UserError`` naming the row.
    """

    def __init__(self, source: Any, *, image_column: str, caption_column: str = "caption", split: str = "train",
                 strict: bool = False, max_samples: int | None = None, image_root: str | None = None):
        self._src = open_captions(source, image_column=image_column, caption_column=caption_column, split=split,
                                  strict=strict, keys=("image_columns", "caption_column"), image_root=image_root)
        self.description = self._src.description
        self.counts = self._src.counts
        rows = []
        for i in range(len(self._src)):
            if not isinstance(self._src.caption(i), str):
                if strict:
                    raise UserError(f"{self.description}: {self._src.row(i)} has no caption in column {caption_column!r}")
                self.counts["missing_caption"] += 1
                continue
            rows.append(i)
        if max_samples is not None:
            rows = rows[:max_samples]
        if not rows:
            raise UserError(f"{self.description} has no row with a caption in column {caption_column!r}")
        self._rows, self._strict, self._image_column = rows, strict, image_column
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self._rows)

    def caption(self, i: int) -> str:
        return self._src.caption(self._rows[i])

    def image(self, i: int):
        """The RGB PIL image of item ``i``, or None (lenient mode) when it cannot be decoded."""
        row = self._rows[i]
        try:
            return self._src.image(row)
        except _BadImage as exc:
            if self._strict:
                raise UserError(f"{self.description}: {self._src.row(row)}, column {self._image_column!r}: "
                                f"{exc.detail}") from None
            if row not in self._failed:
                self._failed.add(row)
                self.counts[exc.reason] += 1
            return None

    def report(self) -> dict[str, int]:
        return {"rows": len(self), **{k: int(v) for k, v in sorted(self.counts.items())}}

    def summary(self) -> str:
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()) if v)
        return f"{len(self)} image-caption rows from {self.description}" + (f" (skipped: {skipped})" if skipped else "")


class ImageCaptionTransform:
    """Resize (shorter side to ``resolution``), crop square, maybe flip; pixels in [-1, 1] plus SDXL size info.

    Randomness comes from the ``random.Random`` passed in (flip, then crop top, then crop left), so a run
    resumed at step k sees the same crops.
    """

    def __init__(self, resolution: int, *, random_flip: bool = False, center_crop: bool = False):
        self.resolution, self.random_flip, self.center_crop = int(resolution), bool(random_flip), bool(center_crop)

    def __call__(self, image, rng) -> dict[str, Any]:
        from PIL import Image

        w, h = image.size
        res = self.resolution
        size = (res, max(res, round(h * res / w))) if w <= h else (max(res, round(w * res / h)), res)
        resized = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
        flip = self.random_flip and rng.random() < 0.5
        free_h, free_w = size[1] - res, size[0] - res
        if self.center_crop:
            top, left = int(round(free_h / 2.0)), int(round(free_w / 2.0))
        else:
            top, left = min(int(rng.random() * (free_h + 1)), free_h), min(int(rng.random() * (free_w + 1)), free_w)
        crop = resized.crop((left, top, left + res, top + res))
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = free_w - left
        return {"pixels": to_tensor(crop), "original_size": (h, w), "crop_top_left": (top, left)}


__all__ = ["CAPTIONS_FILE", "CaptionFolder", "CaptionRows", "CaptionTable", "ImageCaptionTransform", "ImageCaptions",
           "open_captions", "usable_rows"]
