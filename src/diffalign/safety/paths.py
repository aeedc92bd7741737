"""Files named inside data (a manifest row, a parquet image path) stay inside the folder they belong to, as
image-folder captions already do (issue 22, defects 8 and 14): no absolute path, no `..`, no symlink whose target
lies outside."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


def outside_reason(root: str | os.PathLike, name: str) -> str | None:
    """Why `name` (relative to `root`) leaves `root`, or None when it stays inside."""
    if "\x00" in name:
        return "a name with a NUL byte"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a path with '..'"
    try:
        target = (Path(root) / name).resolve()
        inside = Path(root).resolve()
    except (OSError, RuntimeError, ValueError):
        return "a symlink loop"
    if not target.is_relative_to(inside):
        return f"a symlink to {target}"
    return None


def inside_reason(root: str | os.PathLike, path: str) -> str | None:
    """Why `path` (absolute, or relative to the working folder) is not inside `root`, or None."""
    if "\x00" in path:
        return "a name with a NUL byte"
    try:
        target = Path(path).resolve()
        inside = Path(root).resolve()
    except (OSError, RuntimeError, ValueError):
        return "a symlink loop"
    if not target.is_relative_to(inside):
        return f"{target} is outside it"
    return None
