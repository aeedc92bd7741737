"""Preference pairs in the Pick-a-Pic schema: load, validate, pick winner and loser, decode lazily.

Schema (Pick-a-Pic v1/v2): `caption, jpg_0, jpg_1, label_0, label_1`. `jpg_*` are encoded image bytes (a
`bytes` value, a `{"bytes": ..., "path": ...}` dict, or an `Image` feature); `label_i = 1` marks the preferred
image and `0.5/0.5` a tie. The winner and loser come from the labels, never from the column order. Ties are
dropped (`ties="drop"`, the Diffusion-DPO paper's choice) or refused (`ties="error"`); they never mean "image 0
wins". `swap=True` exchanges winner and loser (Diffusion-NPO trains on swapped pairs). Sources and the
image-folder layout: see `sources.py`.

Validation is split by cost. Captions, labels and empty image cells are checked for every row up front from
column reads (no image is decoded at construction). Images are decoded when an item is fetched; there a row can
still fail (undecodable bytes, smaller than `min_size`).

- `strict=True`: the first bad row raises `UserError` naming the row index (in the split), column and reason.
- `strict=False` (default): bad rows are skipped and counted per reason. A row that fails at fetch time makes
  `__getitem__` return a `SkippedPair` (index, row, column, reason) instead of raising, so one bad image never
  stops a training run; `collate_pairs` drops it and lists it in `batch["skipped"]`. DataLoader workers are
  separate processes, so the main process hands those back with `pairs.record_skipped(batch["skipped"])` to make
  `report()` complete (`build_cache` and `validate_images()` do it themselves).

`report()` is a flat dict of counts (stable keys, for trackers and the run folder); `summary()` one line of it.
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..errors import UserError
from ..fsutil import atomic_write_text
from .sources import BadEntry, Source, resolve_source

TIES = ("drop", "error")
#: Reasons a row is not used; all appear in `report()` (0 when none).
ROW_REASONS = ("tie", "bad_label", "missing_caption", "bad_caption", "missing_image")
FETCH_REASONS = ("undecodable_image", "image_too_small", "image_too_large")
_LABEL_VALUES = (0.0, 0.5, 1.0)


class SkippedPair(NamedTuple):
    """What `PreferencePairs[i]` gives (lenient mode) for a pair whose image failed when it was fetched."""

    index: int
    row: int
    column: str
    reason: str
    detail: str = ""


def is_skipped(item: Any) -> bool:
    """True for items a collator must drop: None or a `SkippedPair`."""
    return item is None or isinstance(item, SkippedPair)


class _BadImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_image(value: Any, min_size: int = 0):
    """Encoded image (bytes, {"bytes","path"} dict, path or PIL image) -> RGB PIL image, or `_BadImage`."""
    from PIL import Image, ImageOps

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise _BadImage("missing_image", "no image in this cell")
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, os.PathLike)):
            img = Image.open(value)
        else:
            raise _BadImage("undecodable_image", f"unsupported image value of type {type(value).__name__}")
        from ..safety.images import to_rgb, too_many_pixels

        too_large = too_many_pixels(img)  # from the header, before decoding (issue 22)
        if too_large:
            raise _BadImage("image_too_large", too_large)
        img.load()  # decode now: truncated or corrupt data fails here, not later in a worker
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = to_rgb(img)
    except _BadImage:
        raise
    except FileNotFoundError as exc:
        raise _BadImage("missing_image", f"file not found: {exc.filename}") from None
    except Image.UnidentifiedImageError:
        raise _BadImage("undecodable_image", "not an image in a format PIL can read") from None
    except Exception as exc:  # PIL raises many types (OSError for truncated data, SyntaxError, ValueError, ...)
        raise _BadImage("undecodable_image", f"cannot decode image ({type(exc).__name__}: {exc})") from None
    if min_size and min(img.size) < min_size:
        raise _BadImage("image_too_small", f"image is {img.size[0]}x{img.size[1]}, smaller than min_size={min_size}")
    return img


def _close(a: np.ndarray, value: float) -> np.ndarray:
    return np.isclose(a, value, rtol=0.0, atol=1e-6)


def _labels(values: list) -> np.ndarray:
    """Float labels; anything not a finite number (None, text, NaN) becomes NaN and fails validation."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[i] = f
    return out


def _fmt_label(values: np.ndarray, i: int) -> str:
    v = float(values[i])
    return "missing" if np.isnan(v) else f"{v:g}"


def count_parts(r: dict) -> list[str]:
    """The skip and keep counts of a pairs report as summary phrases (rows skipped up front, at fetch, empty
    captions kept)."""
    parts = []
    skipped = [f"{r[k]} {k}" for k in ROW_REASONS if r[k]]
    if skipped:
        parts.append("skipped " + ", ".join(skipped))
    fetched = [f"{r[k]} {k}" for k in FETCH_REASONS if r[k]]
    if fetched:
        parts.append("skipped at fetch " + ", ".join(fetched))
    if r["empty_caption"]:
        parts.append(f"{r['empty_caption']} empty captions kept")
    return parts


class PreferencePairs(Dataset):
    """Validated preference pairs; `pairs[i]` -> {"index", "row", "caption", "image_w", "image_l"} (PIL RGB).

    Built by `load_pairs`. `index` is the position in this dataset (what augmentation seeds and the cache key
    on), `row` the row in the source split (what messages name). Images are decoded on fetch only.
    """

    def __init__(
        self,
        source: Source,
        *,
        rows: np.ndarray,
        first_wins: np.ndarray,
        captions: list[str],
        image_columns: tuple[str, str],
        counts: Counter,
        settings: dict,
        min_size: int = 0,
        strict: bool = False,
        image_root: str | None = None,
        confine_paths: bool | None = None,
    ):
        self.source = source
        self.image_root = image_root
        # Folders are confined when read; in-memory data is the caller's, unless it came from files (a stream).
        self._confine = source.kind not in ("folder", "memory") if confine_paths is None else confine_paths
        self._table = source.table
        self._table.prepare_images(image_columns)
        self._rows = np.asarray(rows, dtype=np.int64)
        self._first_wins = np.asarray(first_wins, dtype=bool)
        self._captions = list(captions)
        self.image_columns = tuple(image_columns)
        self._counts = Counter(counts)
        self.settings = dict(settings)
        self.min_size = int(min_size)
        self.strict = bool(strict)
        self._skipped: dict[int, SkippedPair] = {}  # row -> failure seen at fetch time (in this process)

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, index: int) -> int:
        return int(self._rows[index])

    def caption(self, index: int) -> str:
        return self._captions[index]

    def __getitem__(self, index: int) -> dict | SkippedPair:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"pair index {index} out of range for {n} pairs")
        row = int(self._rows[index])
        if row in self._skipped:
            return self._skipped[row]._replace(index=index)
        raw = self._table.images(row)
        order = (0, 1) if self._first_wins[index] else (1, 0)
        images = []
        for pos in order:
            column = self.image_columns[pos]
            cell = raw[pos]
            if self._confine:
                from ..safety.paths import confine_image_cell

                cell = confine_image_cell(cell, self.image_root, f"{self.source.description}: row {row}, column "
                                                                 f"{column!r}")
            try:
                images.append(decode_image(cell, self.min_size))
            except _BadImage as bad:
                if self.strict:
                    raise UserError(self._where(row, column, bad.reason, bad.detail)) from None
                skipped = SkippedPair(index, row, column, bad.reason, bad.detail)
                self._skipped[row] = skipped
                return skipped
        return {"index": index, "row": row, "caption": self._captions[index], "image_w": images[0], "image_l": images[1]}

    def _where(self, row: int, column: str, reason: str, detail: str) -> str:
        return (
            f"{self.source.description}: row {row}, column {column!r}: {reason} ({detail}); "
            "fix or remove the row, or run without strict to skip bad rows"
        )

    # ------------------------------------------------------------------------------------------- reporting
    def record_skipped(self, skipped: Iterable[SkippedPair]) -> None:
        """Merge fetch-time failures seen elsewhere (DataLoader workers, via `batch["skipped"]`) into the report."""
        for item in skipped:
            if isinstance(item, SkippedPair):
                self._skipped.setdefault(int(item.row), item)

    def skipped_pairs(self) -> list[SkippedPair]:
        """Fetch-time failures known so far, by row."""
        return [self._skipped[r] for r in sorted(self._skipped)]

    def validate_images(self, progress: bool = True) -> dict[str, int]:
        """Decode every pair once (a full pass) so `report()` counts every bad image before training."""
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)), desc="checking images", disable=not progress, unit="pair"):
            self[i]
        return self.report()

    def report(self) -> dict[str, int]:
        """Counts: rows read, pairs kept, rows skipped per reason, empty captions (kept), fetch-time failures."""
        fetch = Counter(s.reason for s in self._skipped.values())
        out = {"rows": int(self._counts["rows"]), "pairs": len(self)}
        for reason in ROW_REASONS + FETCH_REASONS:
            out[reason] = int(self._counts[reason] + fetch[reason])
        out["empty_caption"] = int(self._counts["empty_caption"])
        for key, value in self.source.extra_counts.items():
            out[key] = int(value)
        out["usable_pairs"] = len(self) - len(self._skipped)
        return out

    def summary(self) -> str:
        r = self.report()
        parts = [f"{self.source.description}: {r['rows']} rows -> {r['pairs']} pairs", *count_parts(r)]
        if r.get("unlisted_file"):
            parts.append(f"{r['unlisted_file']} image files without a captions entry ignored")
        if self.settings.get("swap"):
            parts.append("winner and loser swapped")
        return "; ".join(parts)

    def save_report(self, path: str | os.PathLike) -> None:
        """Write summary, counts and the fetch-time failures known so far as JSON (e.g. into the run folder)."""
        import json

        data = {"summary": self.summary(), "counts": self.report(), "settings": self.settings,
                "skipped_at_fetch": [s._asdict() for s in self.skipped_pairs()]}
        atomic_write_text(path, json.dumps(data, indent=1, default=str))

    def identity(self) -> dict:
        """What the data is, for the cache fingerprint: source identity plus every setting that changes pairs."""
        return {"source": self.source.identity, **self.settings}

    def __repr__(self) -> str:
        return f"PreferencePairs({self.summary()})"


# ------------------------------------------------------------------------------------------------- load
def load_pairs(
    dataset_name: Any,
    *,
    split: str = "train",
    caption_column: str = "caption",
    image_columns: Sequence[str] = ("jpg_0", "jpg_1"),
    label_columns: Sequence[str] = ("label_0", "label_1"),
    ties: str = "drop",
    strict: bool = False,
    max_samples: int | None = None,
    swap: bool = False,
    min_size: int = 0,
    cache_dir: str | os.PathLike | None = None,
    image_root: str | None = None,
    data_files: Sequence[str] | None = None,
    confine_paths: bool | None = None,
) -> PreferencePairs:
    """Load preference pairs from a hub id, `save_to_disk` folder, parquet file(s)/glob or image folder.

    `max_samples` reads only the first that many rows of the split (before validation: the report says how
    many pairs remain). `min_size` refuses images whose shorter side is smaller (0: no check; set it to the
    training resolution to refuse upsampling). `cache_dir` is where `datasets` keeps its Arrow copy of hub and
    parquet data. Column names are ignored for image folders (their layout fixes them, see `sources.py`).
    `image_root`: cells that hold a file path instead of image bytes are read only from inside this folder
    (relative paths are relative to it); without it such cells are refused.
    `data_files`: only these files (patterns inside the repo) of a hub dataset, e.g. a few shards.
    `confine_paths`: apply `image_root` to in-memory data too (rows a stream read from files); default: to every
    source but folders (confined as they are read) and in-memory datasets.
    """
    if ties not in TIES:
        raise UserError(f"ties={ties!r} is not a tie policy; use one of: {', '.join(TIES)} (ties never mean image 0 wins)")
    image_columns, label_columns = tuple(image_columns), tuple(label_columns)
    if len(image_columns) != 2 or len(label_columns) != 2:
        raise UserError("image_columns and label_columns each need exactly two names (image 0, image 1)")
    if max_samples is not None and int(max_samples) < 1:
        raise UserError(f"max_samples must be at least 1, got {max_samples}")

    source = resolve_source(dataset_name, split=split, caption_column=caption_column, strict=strict, cache_dir=cache_dir,
                            data_files=data_files)
    is_folder = source.kind == "folder"
    if is_folder:
        image_columns, label_columns = ("w", "l"), None
    table = source.table
    needed = [caption_column, *image_columns, *(label_columns or ())]
    present = table.column_names
    missing = [c for c in needed if c not in present]
    if missing:
        raise UserError(
            f"{source.description} has no column {missing[0]!r}"
            + (f" (nor {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else "")
            + f"; columns present: {', '.join(present)}. Map yours with caption_column/image_columns/label_columns"
        )
    if max_samples is not None:
        table = table.head(int(max_samples))
        source.table = table

    n = len(table)
    reason = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    column = np.full(n, "", dtype=object)

    def mark(mask: np.ndarray, why: str, col: str, text) -> None:
        fresh = mask & (reason == "")
        for i in np.flatnonzero(fresh):
            reason[i], column[i], detail[i] = why, col, text(i) if callable(text) else text

    captions = table.column(caption_column)
    empty = np.zeros(n, dtype=bool)
    for i, c in enumerate(captions):
        if c is None:
            reason[i], column[i], detail[i] = "missing_caption", caption_column, "caption is empty (None)"
        elif isinstance(c, BadEntry):
            reason[i], column[i], detail[i] = "bad_caption", c.column, c.detail
        elif not isinstance(c, str):
            reason[i], column[i], detail[i] = "bad_caption", caption_column, f"caption is {type(c).__name__}, not text"
        elif not c.strip():
            empty[i] = True

    if label_columns is None:
        first_wins = np.ones(n, dtype=bool)
        tie = np.zeros(n, dtype=bool)
    else:
        l0, l1 = (_labels(table.column(c)) for c in label_columns)
        ok0 = np.logical_or.reduce([_close(l0, v) for v in _LABEL_VALUES])
        ok1 = np.logical_or.reduce([_close(l1, v) for v in _LABEL_VALUES])
        shown = lambda i: f"labels ({_fmt_label(l0, i)}, {_fmt_label(l1, i)}); expected 1/0, 0/1 or 0.5/0.5 (1 = preferred)"
        mark(~ok0, "bad_label", label_columns[0], shown)
        mark(~ok1, "bad_label", label_columns[1], shown)
        mark(~_close(l0 + l1, 1.0), "bad_label", f"{label_columns[0]}+{label_columns[1]}", shown)
        tie = _close(l0, 0.5) & _close(l1, 0.5)
        first_wins = _close(l0, 1.0)

    for col in image_columns:
        nulls = table.null_mask(col)
        if nulls is not None:
            text = (lambda i, col=col: f"no file {col}/{table.names[i]}") if is_folder else "no image in this cell"
            mark(nulls, "missing_image", col, text)

    bad_rows = np.flatnonzero(reason != "")
    first_bad = int(bad_rows[0]) if (strict and len(bad_rows)) else n
    tie_rows = np.flatnonzero(tie & (reason == ""))
    first_tie = int(tie_rows[0]) if (ties == "error" and len(tie_rows)) else n
    if min(first_bad, first_tie) < n:
        i = min(first_bad, first_tie)
        if i == first_tie and reason[i] == "":
            raise UserError(
                f"{source.description}: row {i} is a tie (labels 0.5/0.5) and ties='error'; "
                "use ties='drop' to skip ties (no image wins a tie)"
            )
        raise UserError(
            f"{source.description}: row {i}, column {column[i]!r}: {reason[i]} ({detail[i]}); "
            "fix or remove the row, or run without strict to skip bad rows"
        )
    mark(tie, "tie", "labels", "tie")

    keep = reason == ""
    counts = Counter(str(r) for r in reason[~keep])
    counts["rows"] = n
    counts["empty_caption"] = int((empty & keep).sum())
    rows = np.flatnonzero(keep)
    settings = {
        "split": split, "caption_column": caption_column, "image_columns": list(image_columns),
        "label_columns": list(label_columns) if label_columns else None, "ties": ties, "swap": bool(swap),
        "max_samples": max_samples, "min_size": int(min_size),
    }
    return PreferencePairs(
        source,
        rows=rows,
        first_wins=first_wins[rows] ^ bool(swap),
        captions=[captions[i] for i in rows],
        image_columns=image_columns,
        counts=counts,
        settings=settings,
        min_size=min_size,
        strict=strict,
        image_root=image_root,
        confine_paths=confine_paths,
    )

