"""A disk that fills up mid-run (issue 22, defect 7).

The up-front checks (free space for one checkpoint, a writable folder) cannot see other writers filling the disk
later. A write that fails with ENOSPC (or EDQUOT) used to end in a traceback, leaving `train_report.json` at
`running`. Commands catch it with `is_disk_full`, leave what they wrote completely in place (checkpoints and
shards are written under temporary names and renamed, so the last good one stays `latest`), and stop with
`DiskFull`: one line, exit code 28 (ENOSPC's number), distinct from the usual 2.
"""

from __future__ import annotations

import errno

from ..errors import UserError

DISK_FULL_EXIT = 28
_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    exit_code = DISK_FULL_EXIT
    status = "failed: disk full"


def is_disk_full(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it was raised from, is a write failing for lack of space (safetensors wraps
    the OSError in its own error, with only the text)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _ERRNOS:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def failed_file(exc: BaseException) -> str:
    name = getattr(exc, "filename", None)
    return f" ({name})" if name else ""


def disk_full_message(exc: BaseException) -> str | None:
    """The one line for a command that met a full disk (None when `exc` is something else). Commands that write
    under temporary names and resume (generate, pairs) continue where they stopped when run again."""
    if not is_disk_full(exc):
        return None
    return (f"the disk is full: a write failed{failed_file(exc)} (No space left on device); everything written "
            "before is complete and kept: free some space and run the same command again (generate and pairs "
            "continue where they stopped)")
