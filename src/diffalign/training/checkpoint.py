"""Checkpoints that resume exactly: trainable weights, optimizer, LR scheduler, EMA and the step.

All randomness of the loop is derived from (seed, step), so no RNG state needs saving: a run resumed from
step k draws the same data order, noise and timesteps as one that never stopped. A checkpoint is written
into a temporary folder and renamed into place, so an interrupted write never looks like a checkpoint.
Weights are safetensors; optimizer and scheduler states are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(output_dir, step: int, *, weights: dict, optimizer, lr_scheduler, ema: dict | None = None,
                    extra: dict | None = None, total_limit: int | None = None) -> Path:
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(weights), tmp / "trainable.safetensors")
    if ema is not None:
        save_file(_contiguous(ema), tmp / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"global_step": step, **(extra or {})}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if total_limit:
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(output_dir, resume_from_checkpoint: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint in output_dir (None if there is none yet); a path -> that path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / "state.json").is_file():
        raise UserError(f"resume_from_checkpoint '{path}' is not a complete checkpoint folder (no state.json); "
                        f"use 'latest' or a checkpoint-N folder under {output_dir}")
    return path


def load_checkpoint(path: Path, *, params: dict[str, torch.nn.Parameter], optimizer, lr_scheduler,
                    ema: dict | None = None) -> dict:
    """Restore into live objects; returns the saved state (global_step, ...)."""
    weights = load_file(path / "trainable.safetensors")
    missing = sorted(set(params) - set(weights))
    if missing:
        raise UserError(f"checkpoint '{path}' does not match this run's trainable parameters "
                        f"(missing {len(missing)}, e.g. {missing[0]}): was it made with another train_mode or rank?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    if ema is not None and (path / "ema.safetensors").is_file():
        for name, tensor in load_file(path / "ema.safetensors").items():
            ema[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
