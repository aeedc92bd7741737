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


def image_path_in_cell(value) -> str | None:
    """The file path an image cell points to when it holds a path and no bytes (a `{"bytes": None, "path": ...}`
    struct, or a plain string), else None."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return None
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return None


def confine_image_cell(value, image_root: str | None, where: str):
    """`value` with a path-only cell resolved inside `image_root` (relative paths are relative to it); UserError
    when there is no image_root or the path leaves it. Cells holding bytes pass unchanged (issue 22, defect 14)."""
    from ..errors import UserError

    path = image_path_in_cell(value)
    if path is None:
        return value
    if not image_root:
        raise UserError(f"{where}: the image is a file path ({path[:200]!r}), not image bytes; set image_root to the "
                        "folder that holds such images (paths outside it are refused)")
    full = path if os.path.isabs(path) else os.path.join(image_root, path)
    reason = inside_reason(image_root, full)
    if reason:
        raise UserError(f"{where}: the image path {path[:200]!r} is outside image_root '{image_root}' ({reason}); "
                        "refusing to read it")
    return full
