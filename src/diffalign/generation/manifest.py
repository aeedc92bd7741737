"""A generated folder's `manifest.jsonl`: one JSON row per image (file, prompt, seed, index, settings), read and
written here only. While sampling, each process appends its rows to its own part file; the main process then
writes the one manifest (`write_manifest`, atomic) and removes the parts. A torn last line of a killed writer is
ignored when read back."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_write_text

MANIFEST = "manifest.jsonl"
PART_GLOB = ".manifest-part-*.jsonl"


def part_file(out: Path, index: int) -> Path:
    """The part file process `index` appends its rows to."""
    return out / f".manifest-part-{index}.jsonl"


def _read_rows(path: Path) -> list[dict]:
    """Rows of a manifest or part file; a torn last line (a killed writer) is ignored."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("index"), int):
            rows.append(row)
    return rows


def existing_rows(out: Path) -> list[dict]:
    """Every row in the folder: its manifest's and the part files' (a killed run leaves both)."""
    paths = ([out / MANIFEST] if (out / MANIFEST).is_file() else []) + sorted(out.glob(PART_GLOB))
    return [row for path in paths for row in _read_rows(path)]


def clear(out: Path, rows: list[dict]) -> None:
    """--overwrite: remove the images an earlier job listed, its manifest and its part files."""
    for row in rows:
        name = str(row.get("file", ""))
        if name and Path(name).name == name:  # only plain file names inside the folder
            (out / name).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for part in out.glob(PART_GLOB):
        part.unlink(missing_ok=True)


def write_manifest(out: Path, rows: list[dict]) -> None:
    """Main process: `rows` as the folder's manifest.jsonl (atomically); the part files removed."""
    atomic_write_text(out / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows))
    for part in out.glob(PART_GLOB):
        part.unlink(missing_ok=True)


def read_manifest(folder: str | Path) -> list[dict]:
    path = Path(folder) / MANIFEST
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["MANIFEST", "PART_GLOB", "clear", "existing_rows", "part_file", "read_manifest", "write_manifest"]
