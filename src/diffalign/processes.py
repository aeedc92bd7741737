"""Joining the processes of an `accelerate launch` / `torchrun` job, for every command that shares work out.

On a machine without GPUs accelerate starts a CPU process group (gloo) only when told `cpu=True`; otherwise
every launched process runs as its own single-process job, each doing the whole job and all writing the same
folder. `cpu_process_group()` says when to ask for it; `check_joined` refuses to go on when accelerate joined
fewer processes than the launcher started. `join_processes()` does both for the commands that need only
accelerate's `PartialState` (generate, pairs, evaluate); training builds its `Accelerator` with the same two.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from accelerate import PartialState


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_process_group() -> bool:
    """True under a multi-process launch on a machine with no GPU: accelerate must be told `cpu=True`."""
    import torch

    return launched_processes() > 1 and not torch.cuda.is_available()


def check_joined(num_processes: int, consequence: str = "") -> None:
    """Refuse to run when the launcher started several processes but accelerate joined another number;
    `consequence` says what would go wrong (ends the message's first part)."""
    launched = launched_processes()
    if launched > 1 and num_processes != launched:
        raise UserError(f"the launcher started {launched} processes but accelerate joined {num_processes}: "
                        f"{consequence + '; ' if consequence else ''}check the accelerate config (distributed_type)"
                        + (" and that all processes see the same devices" if consequence else ""))


def join_processes() -> PartialState:
    """accelerate's `PartialState` for this job, with every launched process in it."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu_process_group())
    check_joined(state.num_processes)
    return state


__all__ = ["check_joined", "cpu_process_group", "join_processes", "launched_processes"]
