"""Prompt sets: one prompt a line, JSONL with a `prompt` field, or a dataset column.

A dataset column is named `hf:SOURCE:SPLIT:COLUMN`, e.g. `hf:yuvalkirstain/pickapic_v2:test_unique:caption`
(Pick-a-Pic's 500 unique test captions). SOURCE is a hub dataset id, a parquet file or a `save_to_disk`
folder; SPLIT may be empty for sources with one split (`hf:prompts.parquet::caption`). Dataset prompts are
deduplicated keeping each one's first occurrence (the count dropped is printed), because a caption column
repeats prompts once per annotated pair and a benchmark wants each prompt once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError
from ..safety.text import read_utf8

DATASET_PREFIX = "hf:"


def read_prompts(path: str | Path) -> list[str]:
    """Read a prompt set: a prompts file (see `read_prompts_file`) or `hf:SOURCE:SPLIT:COLUMN`."""
    if str(path).startswith(DATASET_PREFIX):
        return read_dataset_prompts(str(path))
    return read_prompts_file(path)


def read_prompts_file(path: str | Path) -> list[str]:
    """Read a prompts file. Blank lines are skipped; in JSONL every line must carry a string `prompt`.

    An empty prompt is allowed in JSONL (`{"prompt": ""}`), the unconditional case.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"prompts file '{path}' is a symlink that leads nowhere (a symlink loop or a missing target): "
                        "give the file itself")
    if not path.is_file():
        raise UserError(f"prompts file '{path}' does not exist: pass a text file (one prompt a line), JSONL with a "
                        "'prompt' field, or a dataset column as hf:SOURCE:SPLIT:COLUMN")
    lines = read_utf8(path, "prompts file").splitlines()
    is_jsonl = path.suffix == ".jsonl" or any(line.lstrip().startswith("{") for line in lines[:1])
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be an object with a 'prompt' field") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{number}: no string 'prompt' field in this JSON line")
        prompts.append(row["prompt"])
    if not prompts:
        raise UserError(f"prompts file '{path}' holds no prompts")
    return prompts


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
        from ..data.prompts import load_prompts

        rows = load_prompts(source, column, split=split or "train")
    else:
        rows = _stream_column(source, split or "train", column)
    unique = dedupe(rows)
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
