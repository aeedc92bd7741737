"""Prompt sets: one reader for every command that takes prompts (`diffalign train`'s data-free Self-NPO,
`diffalign pairs`, `diffalign generate`), so a file means the same to all of them.

`read_prompts(source, column)` reads:

- ``toy``, ``toy:train``, ``toy:heldout``: the toy world's prompt sets (``toy`` is ``toy:train``);
- ``hf:SOURCE:SPLIT:COLUMN``: a dataset column, e.g. ``hf:yuvalkirstain/pickapic_v2:test_unique:caption``
  (Pick-a-Pic's 500 unique test captions). SOURCE is a hub dataset id, a parquet file or a ``save_to_disk``
  folder; SPLIT may be empty for sources with one split (``hf:prompts.parquet::caption``). Deduplicated keeping
  each prompt's first occurrence (the count dropped is printed): a caption column repeats prompts once per
  annotated pair, and a prompt set wants each prompt once;
- a text file (any file but ``.parquet``): one prompt a line, blank lines skipped; JSONL when the suffix is
  ``.jsonl`` or the first line starts with ``{``: one JSON object a line with a string ``column`` field
  (``prompt`` is accepted too; an empty string is the unconditional case);
- anything else ``diffalign.data`` reads as a table (parquet file or glob, ``save_to_disk`` folder, hub id): the
  ``column`` column row by row, as training reads it (not deduplicated). Empty strings are kept (the
  unconditional case), missing values are skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..safety.text import read_utf8
from ..toy.prompts import PROMPT_SETS, toy_prompts  # the toy world's prompt sets by name
from .sources import resolve_source

DATASET_PREFIX = "hf:"


def read_prompts(source: Any, column: str = "caption", *, split: str = "train",
                 max_samples: int | None = None) -> list[str]:
    """Prompts from ``source`` (see the module docstring), in source order; at most ``max_samples``."""
    text = str(source)
    if text in PROMPT_SETS:
        prompts, shown = toy_prompts(PROMPT_SETS[text]), f"the toy world's prompt set {text!r}"
    elif text.startswith(DATASET_PREFIX):
        prompts, shown = read_dataset_prompts(text), f"prompt set {text!r}"
    else:
        path = Path(text).expanduser()
        if path.is_symlink() and not path.exists():
            raise UserError(f"prompts file '{path}' is a symlink that leads nowhere (a symlink loop or a missing "
                            "target): give the file itself")
        if path.is_file() and path.suffix.lower() != ".parquet":
            prompts, shown = _read_text_prompts(path, column), f"prompts file '{path}'"
        elif not path.exists() and path.suffix.lower() in (".txt", ".jsonl"):
            raise UserError(f"prompts file '{path}' does not exist: pass a text file (one prompt a line), JSONL with "
                            "a 'prompt' field, or a dataset column as hf:SOURCE:SPLIT:COLUMN")
        else:
            prompts, shown = _table_column(source, column, split)
    if max_samples is not None:
        prompts = prompts[:max_samples]
    if not prompts:
        raise UserError(f"{shown} holds no prompts")
    return prompts


def _read_text_prompts(path: Path, column: str) -> list[str]:
    lines = read_utf8(path, "prompts file").splitlines()
    is_jsonl = path.suffix.lower() == ".jsonl" or any(line.lstrip().startswith("{") for line in lines[:1])
    if not is_jsonl:
        return [line.strip() for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be an object with a "
                            f"'{column}' (or 'prompt') field") from None
        value = row.get(column, row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise UserError(f"{path}:{number}: no string '{column}' (or 'prompt') field in this JSON line")
        prompts.append(value)
    return prompts


def _table_column(source: Any, column: str, split: str) -> tuple[list[str], str]:
    """The non-missing values of a table's text column, in row order, and the table's description."""
    src = resolve_source(source, split=split, caption_column=column, strict=False, cache_dir=None)
    if column not in src.table.column_names:
        raise UserError(f"{src.description} has no column {column!r} (columns: "
                        f"{', '.join(src.table.column_names)}); pass --caption_column=...")
    values = src.table.column(column)
    bad = [i for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
    if bad:
        raise UserError(f"{src.description}: row {bad[0]} of column {column!r} is a "
                        f"{type(values[bad[0]]).__name__}, not a string")
    return [v for v in values if v is not None], src.description


def parse_dataset_spec(spec: str) -> tuple[str, str, str]:
    """`hf:SOURCE:SPLIT:COLUMN` -> (source, split, column). SOURCE may itself hold ':' (split from the right)."""
    body = spec[len(DATASET_PREFIX):]
    parts = body.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise UserError(f"prompt set '{spec}': write hf:SOURCE:SPLIT:COLUMN, e.g. "
                        "hf:yuvalkirstain/pickapic_v2:test_unique:caption or hf:prompts.parquet::caption")
    return parts[0], parts[1], parts[2]


def dedupe(prompts: list[str]) -> list[str]:
    """Unique prompts in order of first occurrence."""
    return list(dict.fromkeys(prompts))


def read_dataset_prompts(spec: str) -> list[str]:
    """The unique values of a dataset column, first occurrences kept, in dataset order."""
    source, split, column = parse_dataset_spec(spec)
    if _is_local(source):
        rows, _ = _table_column(source, column, split or "train")
    else:
        rows = _stream_column(source, split or "train", column)
    unique = list(dict.fromkeys(rows))
    print(f"prompts: {len(unique)} unique of {len(rows)} rows in column '{column}' of {source}"
          + (f" split '{split}'" if split else "")
          + (f" ({len(rows) - len(unique)} duplicates dropped, first occurrences kept)" if len(unique) < len(rows) else ""),
          file=sys.stderr)
    return unique


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or source.startswith(("/", "./", "../", "~")) or path.suffix.lower() == ".parquet"


def _stream_column(name: str, split: str, column: str) -> list[str]:
    """Read one column of a hub dataset split by streaming, so that only that split's files are read and no
    other columns (Pick-a-Pic rows carry two images each) are decoded or cached."""
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # the hub client raises many types; all mean "cannot open this split"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot open dataset '{name}' split '{split}' ({first}); check the id, the split and the "
                        "network (or HF_DATASETS_OFFLINE), or give a local parquet / save_to_disk folder") from None
    if stream.column_names is not None and column not in stream.column_names:
        raise UserError(f"dataset '{name}' split '{split}' has no column '{column}' "
                        f"(columns: {', '.join(stream.column_names)})")
    prompts = []
    for i, row in enumerate(stream.select_columns([column])):
        value = row[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(f"dataset '{name}' split '{split}': row {i} of column '{column}' is a "
                            f"{type(value).__name__}, not text")
        prompts.append(value)
    if not prompts:
        raise UserError(f"dataset '{name}' split '{split}' holds no prompts in column '{column}'")
    return prompts


__all__ = ["DATASET_PREFIX", "parse_dataset_spec", "read_dataset_prompts", "read_prompts"]
