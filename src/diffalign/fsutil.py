"""Small filesystem checks shared by commands that write results."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` if needed and prove it is writable before any expensive work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"{what} '{path}' is not writable ({reason}): choose another folder with --out or fix its permissions") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
