"""Image-caption sources for the `target` recipe: real images whose captions the model is asked to draw.

Two kinds, one small interface (`len`, `caption(i)`, `image(i)`, `row(i)`, `counts`, `description`):

- a folder of images with ``captions.jsonl``, one ``{"file_name": ..., "caption": ...}`` a line (the caption key
  is `caption_column`); the line number is the row shown in messages;
- anything `diffalign.data` reads as a table (parquet file or glob, `save_to_disk` folder, hub id) with an image
  column (encoded bytes, ``{"bytes", "path"}`` or a path) and a caption column.

`usable_rows` decodes every image once, before the model loads: strict mode stops at the first bad row naming
it and the reason, lenient mode leaves it out and counts the reason (missing_caption, bad_caption,
missing_image, undecodable_image).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ..data.pairs import _BadImage, decode_image  # noqa: PLC2701 - decode_image's own failure type
from ..errors import UserError

CAPTIONS_FILE = "captions.jsonl"


class _Source:
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


class CaptionFolder(_Source):
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


class CaptionTable(_Source):
    def __init__(self, source: str, image_column: str, caption_column: str, split: str, strict: bool):
        from ..data.sources import resolve_source

        super().__init__(strict)
        src = resolve_source(source, split=split, caption_column=caption_column, strict=strict, cache_dir=None)
        self.description = src.description
        columns = src.table.column_names
        for key, name in (("image_column", image_column), ("caption_column", caption_column)):
            if name not in columns:
                raise UserError(f"{src.description} has no column {name!r} (columns: {', '.join(columns)}); "
                                f"set {key}")
        self._captions = src.table.column(caption_column)
        src.table.prepare_images([image_column])
        self._table = src.table

    def _raw_image(self, i: int):
        return self._table.images(i)[0]


def open_source(source: str, *, image_column: str, caption_column: str, split: str, strict: bool) -> _Source:
    path = Path(source).expanduser()
    if path.is_dir() and (path / CAPTIONS_FILE).is_file() and not (path / "w").is_dir():
        return CaptionFolder(path, caption_column, strict)
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(f"image_caption_source '{source}' is an empty folder: it needs images and {CAPTIONS_FILE}")
    return CaptionTable(source, image_column, caption_column, split, strict)


def usable_rows(src: _Source, limit: int | None) -> list[int]:
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
