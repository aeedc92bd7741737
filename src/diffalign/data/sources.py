"""Where preference rows come from: a hub dataset, a `save_to_disk` folder, parquet files, or image-folder pairs.

`resolve_source(dataset_name, split, ...)` turns what the user typed into a `Source`: a table with one uniform
interface (column names, cheap column reads, per-row image fetch), a description used in every message, and an
identity (paths, sizes, mtimes, dataset fingerprints) that the latent cache hashes.

Which split: a hub dataset and a `save_to_disk` DatasetDict hold several splits and `split` picks one; a missing
split is an error that lists the available ones (never a silent fallback to another split). Parquet files, a
saved single `Dataset`, and a flat image folder are one split: `split` is not used, and the description says
which files were read. An image folder may also hold one sub-folder per split (`root/train/w`, `root/train/l`).

Image-folder layout (winner in `w/`, loser in `l/`, same relative file name)::

    root/
      w/0001.png   w/0002.jpg   ...
      l/0001.png   l/0002.jpg   ...
      captions.jsonl    one JSON object a line: {"file_name": "0001.png", "caption": "a red circle"}
      (or captions.csv  with a header row: file_name,caption)

The captions file is the index: one row per entry (non-blank line), in file order; the entry number (from 0)
is the row index in messages, and a malformed line is a row counted as `bad_caption`. `caption_column` names the
caption key when it is not `caption`. Image files no entry names are not used and are counted as `unlisted_file`
(strict mode refuses them).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..models.source import hub_offline

CAPTION_FILES = ("captions.jsonl", "captions.csv")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_GLOB_CHARS = set("*?[")


@dataclass
class Source:
    kind: str  # hub | disk | parquet | folder | memory
    description: str
    table: Any  # HFTable or FolderTable
    identity: dict
    #: Informational counts that are not rows (e.g. image files no captions entry names).
    extra_counts: Counter = field(default_factory=Counter)


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _stat_files(files: Sequence[Path], root: Path | None = None) -> list[list]:
    out = []
    for f in sorted(files):
        st = f.stat()
        out.append([str(f.relative_to(root)) if root else str(f), st.st_size, st.st_mtime_ns])
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ tables
class HFTable:
    """A `datasets.Dataset` seen through the small interface `PreferencePairs` needs."""

    def __init__(self, ds):
        self.ds = ds.with_format(None)
        self._images = None
        self._image_columns: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return list(self.ds.column_names)

    def __len__(self) -> int:
        return len(self.ds)

    def head(self, n: int) -> "HFTable":
        # A contiguous select slices the Arrow table: no indices mapping, no copy.
        return self if n >= len(self.ds) else HFTable(self.ds.select(range(n)))

    def _arrow_column(self, name: str):
        if getattr(self.ds, "_indices", None) is None:
            return self.ds.data.column(name)
        return self.ds.with_format("arrow")[name]

    def column(self, name: str) -> list:
        return self._arrow_column(name).to_pylist()

    def null_mask(self, name: str) -> np.ndarray | None:
        """Rows whose value in image column `name` is empty, read from validity bitmaps only (no image bytes)."""
        if getattr(self.ds, "_indices", None) is not None:
            return None  # reading would gather every image; fetch-time checks catch these rows instead
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self._arrow_column(name)
        mask = pc.is_null(col)
        if pa.types.is_struct(col.type) and {"bytes", "path"} <= {f.name for f in col.type}:
            both = pc.and_(pc.is_null(pc.struct_field(col, "bytes")), pc.is_null(pc.struct_field(col, "path")))
            mask = pc.or_(mask, both)
        return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)

    def prepare_images(self, columns: Sequence[str]) -> None:
        """Keep only the image columns for fetching, with Image features left undecoded (we decode and check)."""
        from datasets import Image

        ds = self.ds.select_columns(list(columns))
        for name in columns:
            if isinstance(ds.features[name], Image) and ds.features[name].decode:
                ds = ds.cast_column(name, Image(decode=False))
        self._images = ds
        self._image_columns = tuple(columns)

    def images(self, row: int) -> tuple:
        record = self._images[int(row)]
        return tuple(record[c] for c in self._image_columns)


class FolderTable:
    """Rows of an image-folder pairs source: caption, winner path (`w`), loser path (`l`)."""

    def __init__(self, caption_column: str, captions: list, w_paths: list, l_paths: list, names: list):
        self.caption_column = caption_column
        self.names = names  # file_name per row (None for a malformed entry)
        self._columns = {caption_column: captions, "w": w_paths, "l": l_paths}

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(self._columns["w"])

    def head(self, n: int) -> "FolderTable":
        c = self._columns
        return FolderTable(self.caption_column, c[self.caption_column][:n], c["w"][:n], c["l"][:n], self.names[:n])

    def column(self, name: str) -> list:
        return list(self._columns[name])

    def null_mask(self, name: str) -> np.ndarray:
        return np.array([v is None for v in self._columns[name]], dtype=bool)

    def prepare_images(self, columns: Sequence[str]) -> None:
        self._image_columns = tuple(columns)

    def images(self, row: int) -> tuple:
        return tuple(self._columns[c][int(row)] for c in self._image_columns)


# ----------------------------------------------------------------------------------------------- resolve
def resolve_source(
    dataset_name: Any, *, split: str, caption_column: str, strict: bool, cache_dir: str | os.PathLike | None,
    data_files: Sequence[str] | None = None,
) -> Source:
    """Find and open the rows behind `dataset_name` (see the module docstring for what is accepted).
    `data_files`: only these files (patterns inside the repo) of a hub dataset."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise UserError("the 'datasets' package is needed to read preference data: pip install datasets") from exc

    if isinstance(dataset_name, (datasets.Dataset, datasets.DatasetDict)):
        ds = _pick_split(dataset_name, split, "in-memory dataset")
        return Source("memory", "in-memory dataset", HFTable(ds), {"kind": "memory", "fingerprint": ds._fingerprint})
    if isinstance(dataset_name, (list, tuple)):
        return _parquet_source([Path(p).expanduser() for p in dataset_name], str(list(map(str, dataset_name))), cache_dir)

    text = os.fspath(dataset_name)
    path = Path(text).expanduser()
    if data_files and (path.exists() or _GLOB_CHARS & set(text)):
        raise UserError(f"data_files selects files of a hub dataset; {text!r} is local: give its files as "
                        "dataset_name (a parquet file or a glob such as 'data/train-*.parquet') and no data_files")
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise UserError(
                f"dataset file {text!r} is not a .parquet file; give parquet file(s), a save_to_disk folder, "
                "an image folder with w/ and l/, or a hub dataset id"
            )
        return _parquet_source([path], text, cache_dir)
    if path.is_dir():
        return _folder_source(path, text, split, caption_column, strict, cache_dir)
    if _GLOB_CHARS & set(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        if not files:
            raise UserError(f"no files match {text!r}; check the pattern (e.g. 'data/train-*.parquet')")
        return _parquet_source(files, text, cache_dir)
    if text.startswith(("/", "./", "../", "~")) or path.suffix.lower() == ".parquet" or text.count("/") > 1:
        raise UserError(f"dataset path {text!r} does not exist; give parquet file(s), a save_to_disk folder or an image folder")
    return _hub_source(text, split, cache_dir, data_files)


def _pick_split(obj, split: str, shown: str):
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise UserError(f"{shown} has no split {split!r}; available splits: {', '.join(obj) or 'none'}; pass --split")
        return obj[split]
    return obj


def _parquet_source(files: list[Path], shown: str, cache_dir) -> Source:
    import datasets

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"parquet file {missing[0]!r} does not exist")
    bad = [str(f) for f in files if f.suffix.lower() != ".parquet"]
    if bad:
        raise UserError(f"{shown!r} matches non-parquet file {bad[0]!r}; a pattern must match only .parquet files")
    try:
        ds = datasets.load_dataset(
            "parquet", data_files=[str(f.resolve()) for f in files], split="train",
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as exc:
        raise UserError(f"cannot read parquet {shown!r}: {_first_line(exc)}") from exc
    identity = {"kind": "parquet", "files": _stat_files([f.resolve() for f in files])}
    desc = f"parquet {shown!r}" if len(files) == 1 else f"parquet {shown!r} ({len(files)} files)"
    return Source("parquet", desc, HFTable(ds), identity)


def _hub_source(name: str, split: str, cache_dir, data_files: Sequence[str] | None = None) -> Source:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=None if cache_dir is None else str(cache_dir),
                                   data_files=list(data_files) if data_files else None)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise UserError(f"hub dataset {name!r} has no split {split!r}: {_first_line(exc)}") from exc
        raise UserError(f"cannot load hub dataset {name!r}: {_first_line(exc)}") from exc
    except Exception as exc:
        offline = hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}
        hint = (
            "offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) and it is not cached"
            if offline else "check the id and your connection"
        )
        raise UserError(
            f"cannot load hub dataset {name!r} ({hint}): {_first_line(exc)}; or give a local source: "
            "a save_to_disk folder, parquet file(s), or an image folder with w/ and l/"
        ) from exc
    identity = {
        "kind": "hub", "name": name, "split": split, "fingerprint": ds._fingerprint,
        "files": _stat_files([Path(c["filename"]) for c in ds.cache_files]),
    }
    shown = f"hub dataset {name!r} split {split!r}"
    if data_files:
        identity["data_files"] = list(data_files)
        shown += f" (data_files {', '.join(data_files)})"
    return Source("hub", shown, HFTable(ds), identity)


def _folder_source(path: Path, shown: str, split: str, caption_column: str, strict: bool, cache_dir) -> Source:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise UserError(f"cannot read saved dataset {shown!r}: {_first_line(exc)}") from exc
        is_dict = isinstance(obj, datasets.DatasetDict)
        ds = _pick_split(obj, split, f"saved dataset {shown!r}")
        files = [p for p in (path / split if is_dict else path).rglob("*") if p.is_file()]
        identity = {"kind": "disk", "path": str(path.resolve()), "split": split if is_dict else None,
                    "fingerprint": ds._fingerprint, "files": _stat_files(files, path)}
        desc = f"saved dataset {shown!r}" + (f" split {split!r}" if is_dict else "")
        return Source("disk", desc, HFTable(ds), identity)
    if (path / "w").is_dir() and (path / "l").is_dir():
        return _image_folder(path, shown, caption_column, strict)
    split_dirs = sorted(p.name for p in path.iterdir() if (p / "w").is_dir() and (p / "l").is_dir())
    if split_dirs:
        if split not in split_dirs:
            raise UserError(f"image folder {shown!r} has no split {split!r}; available splits: {', '.join(split_dirs)}")
        src = _image_folder(path / split, f"{shown}/{split}", caption_column, strict)
        src.identity["split"] = split
        return src
    if any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")):
        # A local copy of a hub dataset repo: the parquet builder infers splits from file names.
        try:
            ds = datasets.load_dataset(str(path), split=split, cache_dir=None if cache_dir is None else str(cache_dir))
        except ValueError as exc:
            raise UserError(f"dataset folder {shown!r} has no split {split!r}: {_first_line(exc)}") from exc
        except Exception as exc:
            raise UserError(f"cannot read dataset folder {shown!r}: {_first_line(exc)}") from exc
        files = [p for p in path.rglob("*.parquet")]
        identity = {"kind": "parquet-folder", "path": str(path.resolve()), "split": split, "files": _stat_files(files, path)}
        return Source("parquet", f"dataset folder {shown!r} split {split!r}", HFTable(ds), identity)
    raise UserError(
        f"folder {shown!r} is not a preference dataset: expected a save_to_disk folder (dataset_dict.json or "
        "state.json), parquet files, or an image folder with w/ and l/ sub-folders and captions.jsonl/captions.csv"
    )


# ------------------------------------------------------------------------------------------ image folders
def _list_images(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    }


@dataclass(frozen=True)
class BadEntry:
    """Stands in for the caption of a captions-file entry that could not be parsed (counted as bad_caption)."""

    detail: str
    column: str = "file_name"


def _read_caption_entries(file: Path, caption_column: str) -> list[tuple[str | None, Any]]:
    """(file_name, caption value) per entry, in file order; a malformed entry gets (None, BadEntry)."""
    shown = file.name
    entries: list[tuple[str | None, Any]] = []
    from ..safety.text import read_utf8

    text = read_utf8(file, "captions file")  # read and decoded first, so a non-UTF-8 byte names its line
    if file.suffix == ".jsonl":
        for line_no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                entries.append((None, BadEntry(f"line {line_no} of {shown} is not JSON")))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
                entries.append((None, BadEntry(f"line {line_no} of {shown} has no 'file_name' string")))
            else:
                entries.append((obj["file_name"], obj.get(caption_column)))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in ("file_name", caption_column) if c not in header]
        if missing:
            raise UserError(
                f"{file} has no column {missing[0]!r} (columns: {', '.join(header) or 'none'}); "
                "its header must be file_name,caption"
            )
        entries.extend((rec["file_name"], rec[caption_column]) for rec in reader)
    return entries


def _check_inside(root: Path, name: str, row: int, shown: str, index_file: str) -> None:
    """A captions entry may only name files inside the dataset folder: no absolute path, no `..`, no symlink
    whose target lies outside. Refused in lenient mode too: this is an untrusted dataset, not a bad row."""
    from pathlib import PurePosixPath, PureWindowsPath

    reason = None
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        reason = "an absolute path"
    elif ".." in PurePosixPath(name.replace("\\", "/")).parts:
        reason = "a path with '..'"
    else:
        inside = root.resolve()
        for sub in ("w", "l"):
            try:
                target = (root / sub / name).resolve()
            except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
                from ..safety.text import name_problem

                raise UserError(f"image folder {shown!r}: row {row} of {index_file} names {name!r}, which cannot be "
                                f"opened ({name_problem(exc)}); fix the name or the link") from None
            if not target.is_relative_to(inside):
                reason = f"a symlink to {target}"
                break
    if reason:
        raise UserError(
            f"image folder {shown!r}: row {row} of {index_file} names {name!r}, {reason} outside the dataset folder; "
            "file names must be relative paths inside w/ and l/ (refusing to read it)")


def _image_folder(root: Path, shown: str, caption_column: str, strict: bool) -> Source:
    caption_files = [root / n for n in CAPTION_FILES if (root / n).is_file()]
    if not caption_files:
        raise UserError(
            f"image folder {shown!r} has w/ and l/ but no captions.jsonl or captions.csv "
            '(one {"file_name": ..., "caption": ...} per pair)'
        )
    if len(caption_files) > 1:
        raise UserError(f"image folder {shown!r} has both captions.jsonl and captions.csv; keep one")
    entries = _read_caption_entries(caption_files[0], caption_column)
    for row, (name, _) in enumerate(entries):
        if name is not None:
            _check_inside(root, name, row, shown, caption_files[0].name)
    w_files, l_files = _list_images(root / "w"), _list_images(root / "l")
    named = {name for name, _ in entries}
    unlisted = sorted((w_files | l_files) - named)
    if unlisted and strict:
        raise UserError(
            f"image folder {shown!r}: {unlisted[0]!r} (and {len(unlisted) - 1} more) has no entry in "
            f"{caption_files[0].name}; add captions or run without strict"
        )
    captions = [c for _, c in entries]
    w_paths = [str(root / "w" / n) if n in w_files else None for n, _ in entries]
    l_paths = [str(root / "l" / n) if n in l_files else None for n, _ in entries]
    stats = _stat_files([root / "w" / n for n in w_files] + [root / "l" / n for n in l_files] + caption_files, root)
    identity = {"kind": "folder", "path": str(root.resolve()), "files_digest": _digest(stats), "files": len(stats)}
    table = FolderTable(caption_column, captions, w_paths, l_paths, [n for n, _ in entries])
    src = Source("folder", f"image folder {shown!r}", table, identity)
    src.extra_counts["unlisted_file"] = len(unlisted)
    return src
