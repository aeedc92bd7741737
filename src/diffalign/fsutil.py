"""Small filesystem checks shared by commands that write results."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def ensure_writable_dir(path: str | Path, what: str = "output folder", flag: str = "--out") -> Path:
    """Create `path` if needed and prove it is writable before any expensive work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"{what} '{path}' is not writable ({reason}): choose another folder with {flag} or fix its "
                        "permissions") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # the rename must not reach the disk before the data does
    os.replace(tmp, path)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def free_bytes(path: str | Path) -> int:
    """Free space for an unprivileged writer on the file system holding `path` (an existing folder)."""
    return shutil.disk_usage(path).free


def check_free_space(path: str | Path, needed: int, what: str, hint: str = "") -> int:
    """Raise UserError when the file system of `path` has less than `needed` bytes free; returns what is free."""
    free = free_bytes(path)
    if free < needed:
        raise UserError(f"not enough disk space in '{path}' for {what}: about {human_bytes(needed)} needed, "
                        f"{human_bytes(free)} free; free some space or choose another output_dir"
                        + (f" ({hint})" if hint else ""))
    return free
