"""Text files users hand us (captions, prompt files) and names inside them (issue 22, defect 6).

A latin-1 byte, a NUL in a name or a symlink loop used to end in a raw traceback. Here each becomes one line
naming the file, the line and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """The text of `path`; UserError naming the line and the byte when it is not UTF-8, or when it cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} '{path}' cannot be read ({name_problem(exc)})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{what} '{path}', line {line}, column {column}: byte 0x{data[exc.start]:02x} is not UTF-8 "
                        "text (latin-1 or another encoding?); save the file as UTF-8") from None


def name_problem(exc: BaseException) -> str:
    """A short reason for an error about a path: NUL byte, symlink loop, or the OS's words."""
    text = str(exc)
    if isinstance(exc, ValueError) and "null" in text.lower():
        return "the name holds a NUL byte"
    if isinstance(exc, RuntimeError) and "symlink loop" in text.lower() or getattr(exc, "errno", None) == 40:
        return "a symlink loop"
    if isinstance(exc, OSError):
        return exc.strerror or text
    return text
