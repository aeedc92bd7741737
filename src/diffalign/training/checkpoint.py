"""Checkpoints that resume exactly and survive a kill: trainable weights, optimizer, LR scheduler, EMA, the step.

All randomness of the loop is derived from (seed, step), so no RNG state needs saving: a run resumed from
step k draws the same data order, noise and timesteps as one that never stopped.

Crash safety. A checkpoint is written into `.checkpoint-N.tmp`, every file is fsync'ed, and only then is the
folder renamed to `checkpoint-N` (a rename is atomic). `state.json`, written last, lists every file with its
size; a folder is *complete* only if that list checks out, so a half-written or half-deleted folder is never
taken as `latest`. Old checkpoints are renamed to `.trash-*` before they are deleted for the same reason.

Loadable weights. Besides the resume state (`trainable.safetensors`, whose peft keys no loader reads), each
checkpoint holds the weights in the form the run folder holds them, written by the same code
(`write_weights`, the recipe's `save_outputs`): `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights`,
or `unet/` for `UNet2DConditionModel.from_pretrained` (`transformer/` for the transformer class of SD3, FLUX or
CogVideoX; with use_ema: `unet/` the EMA weights, `unet_raw/` the trained ones, as `state.json`'s `weights`
says). So `generate --lora RUN/checkpoint-N` and every command that takes a run folder take any of its
checkpoints.

No pickle. Weights and every tensor of the optimizer/scheduler state are safetensors; the rest of those states
(param groups, step counts) is JSON. Older checkpoints with `optimizer.pt`/`scheduler.pt` still load, through
`torch.load(weights_only=True)`: a file holding anything but tensors and plain containers is refused, and the
code a malicious pickle carries never runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")
FORMAT = 2
#: Tests only: "STEP:SECONDS" makes the writer sleep inside checkpoint STEP after its first file, so a test
#: can SIGKILL the process in the middle of a checkpoint write.
PAUSE_ENV = "DIFFALIGN_TEST_CHECKPOINT_PAUSE"


# ------------------------------------------------------------------------------------------- listing
def is_complete(path: Path) -> bool:
    """True if `path/state.json` exists, parses, and every file it lists is there with the listed size."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    files = state.get("files") if isinstance(state, dict) else None
    if files is None:  # format 1 (before file lists): state.json was written last, trust it if the rest is there
        return all((path / n).is_file() for n in ("trainable.safetensors", "optimizer.pt", "scheduler.pt"))
    try:
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, AttributeError, TypeError, ValueError):  # a hand-edited list: not ours, not complete
        return False


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Leftovers of interrupted writes or deletions: temp folders, trash, `checkpoint-N` folders that fail the check."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (
        p.name.startswith((".checkpoint-", ".trash-checkpoint-")) or (_NAME.match(p.name) and not is_complete(p))))


def remove_incomplete(output_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Delete our own leftovers (temp and trash folders) before training; returns (removed, ignored). A
    `checkpoint-N` folder that fails the check was not made by our writer (it renames only complete folders):
    it is left alone for the user to inspect, and never used by `latest`."""
    removed, ignored = [], []
    for p in incomplete_checkpoints(output_dir):
        if p.name.startswith("."):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        else:
            ignored.append(p)
    return removed, ignored


# -------------------------------------------------------------------------------- state without pickle
def _encode(obj, tensors: dict):
    """A JSON-able mirror of `obj` with tensors moved into `tensors` (types kept exact: tuples, int keys)."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"t": key}
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"u": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"f": repr(obj)}  # JSON has no inf/nan
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        (tag, value), = obj.items()
        if tag == "t":
            return tensors[value]
        if tag == "d":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        if tag == "u":
            return tuple(_decode(v, tensors) for v in value)
        return float(value)
    return obj


def _save_state(state: dict, folder: Path, name: str) -> list[str]:
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return [f"{name}.safetensors", f"{name}.json"]


def _load_state(folder: Path, name: str) -> dict:
    if (folder / f"{name}.json").is_file():
        tensors = _load_tensors(folder / f"{name}.safetensors")
        try:
            return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"checkpoint file '{folder / name}.json' is damaged ({exc}); delete '{folder}' to resume "
                            "from the checkpoint before it") from None
    return load_legacy_pt(folder / f"{name}.pt")


def load_legacy_pt(path: Path):
    """A `.pt` state (format-1 checkpoints) through `torch.load(weights_only=True)`; anything else is refused."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"checkpoint file '{path}' is missing: the checkpoint is incomplete") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(
            f"refusing to load '{path}': it is not a plain tensor file ({first[:160]}). Loading arbitrary pickles "
            "can run code, so only weights_only=True is allowed; diffalign writes checkpoints as safetensors + JSON. "
            "If you trust the file, convert it yourself; otherwise delete it") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UserError(f"checkpoint file '{path}' is missing: the checkpoint is incomplete") from None
    except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
        raise UserError(f"checkpoint file '{path}' is damaged or not safetensors ({exc}); delete '{path.parent}' to "
                        "resume from the checkpoint before it") from None


# ------------------------------------------------------------------------------------------ writing
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause(step: int) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def estimate_checkpoint_bytes(params, *, optimizer_states: int = 2, state_bytes: int = 4, ema: bool = False) -> int:
    """Bytes of one checkpoint: the trainable weights twice (the resume copy and the loadable one), `optimizer_states`
    state tensors per weight (AdamW: 2, at `state_bytes` each: 4 for fp32, ~1 for 8-bit Adam) and an fp32 EMA copy
    if any (twice too: a full fine-tune with EMA also writes it loadable); plus 1% and 1 MB for metadata."""
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * n * p.element_size() + n * optimizer_states * state_bytes + (2 * n * 4 if ema else 0)
    return int(total * 1.01) + (1 << 20)


def save_checkpoint(output_dir, step: int, *, weights: dict, optimizer, lr_scheduler, ema: dict | None = None,
                    extra: dict | None = None, total_limit: int | None = None, write_weights=None) -> Path:
    """Write `checkpoint-{step}` atomically (see the module doc). `write_weights(folder)`, when given, writes the
    loadable weights into the folder (every file it writes is listed in state.json like the rest)."""
    root = Path(output_dir)
    tmp = root / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
    files = ["trainable.safetensors"]
    _test_pause(step)
    if ema is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        files.append("ema.safetensors")
    files += _save_state(optimizer.state_dict(), tmp, "optimizer")
    files += _save_state(lr_scheduler.state_dict(), tmp, "scheduler")
    if write_weights is not None:
        write_weights(tmp)
        files += sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                        if p.is_file() and p.relative_to(tmp).as_posix() not in files)
    return _commit(root, step, tmp, files, extra, total_limit)


def _commit(root: Path, step: int, tmp: Path, files: list[str], extra: dict | None, total_limit: int | None) -> Path:
    """fsync the files, write state.json last, rename the folder into place, rotate old checkpoints."""
    final = root / f"checkpoint-{step}"
    for name in files:
        _fsync(tmp / name)
    state = {"global_step": step, "format": FORMAT, **(extra or {}),
             "files": {name: (tmp / name).stat().st_size for name in files}}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    _fsync(tmp / "state.json")
    if final.exists():  # a rerun from an earlier checkpoint: move the old one aside, never delete before renaming
        trash = root / f".trash-checkpoint-{step}-{time.time_ns()}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(root)
    if total_limit:
        for old in list_checkpoints(root)[:-total_limit]:
            trash = root / f".trash-{old.name}"
            old.rename(trash)  # a kill during rmtree leaves trash, not a checkpoint with files missing
            shutil.rmtree(trash, ignore_errors=True)
    return final


def save_sharded_checkpoint(output_dir, step: int, *, write_shards, lr_scheduler, extra: dict | None = None,
                            total_limit: int | None = None, write_weights=None, main: bool, barrier) -> Path:
    """`checkpoint-{step}` of a sharded run (training/sharding.py), called on EVERY process: the main one makes
    the temp folder, every process writes its part of the state (`write_shards(folder)`, collective) and takes
    part in gathering the loadable weights (`write_weights(folder)`, written by the main process), then the main
    process writes the scheduler state and state.json and renames the folder, as :func:`save_checkpoint` does."""
    root = Path(output_dir)
    tmp = root / f".checkpoint-{step}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_shards(tmp)
    if main:
        _test_pause(step)
    if write_weights is not None:
        write_weights(tmp)
    barrier()  # every process's files are written
    final = root / f"checkpoint-{step}"
    if main:
        _save_state(lr_scheduler.state_dict(), tmp, "scheduler")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        final = _commit(root, step, tmp, files, {**(extra or {}), "sharded": True}, total_limit)
    barrier()  # nobody goes on (or resumes) before the checkpoint is in place
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return bool(read_state(path).get("sharded"))


# ------------------------------------------------------------------------------------------ reading
def resolve_resume(output_dir, resume_from_checkpoint: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint in output_dir (None if there is none yet); a name or path -> that
    folder, which must be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path).is_dir():
        path = Path(output_dir) / path
    if not is_complete(path):
        raise UserError(f"resume_from_checkpoint '{path}' is not a complete checkpoint folder (state.json missing, "
                        f"or a file it lists is missing or truncated); use 'latest' or a checkpoint-N folder under "
                        f"{output_dir}")
    return path


def read_state(path: Path) -> dict:
    """state.json of a checkpoint; UserError when it is not what our writer writes (a hand-edited file)."""
    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint state '{file}' cannot be read ({exc}); resume from another checkpoint") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint state '{file}' has no whole-number global_step (got {str(step)[:40]!r}; was it "
                        "edited by hand?): restore it or resume from another checkpoint")
    for key, value in state.items():
        if key.endswith(("_steps", "_batches", "_rows", "_failures", "consecutive_nonfinite")) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"checkpoint state '{file}': {key} is {str(value)[:40]!r}, not a count (was it edited by "
                            "hand?): restore it or resume from another checkpoint")
    epoch = state.get("fetch_epoch", [0, 0, 0])
    first_bad = state.get("first_bad_step")
    if (not isinstance(epoch, list) or len(epoch) != 3 or not all(type(v) is int and v >= 0 for v in epoch)
            or not (first_bad is None or type(first_bad) is int)):
        raise UserError(f"checkpoint state '{file}': fetch_epoch/first_bad_step are not what diffalign writes (was it "
                        "edited by hand?): restore it or resume from another checkpoint")
    return state


def load_checkpoint(path: Path, *, params: dict[str, torch.nn.Parameter], optimizer, lr_scheduler,
                    ema: dict | None = None, method: str | None = None) -> dict:
    """Restore into live objects; returns the saved state (global_step, ...)."""
    state = read_state(path)
    if method is not None and state.get("method", method) != method:
        raise UserError(f"checkpoint '{path}' was written by a method={state['method']} run, and this run is "
                        f"method={method}: resume it with the same method, or use another output_dir")
    if state.get("sharded"):
        raise UserError(f"checkpoint '{path}' holds the sharded state of an FSDP run: resume it launched the same way "
                        "(accelerate launch --config_file configs/accelerate/fsdp.yaml ...)")
    weights = _load_tensors(path / "trainable.safetensors")
    missing = sorted(set(params) - set(weights))
    if missing:
        raise UserError(f"checkpoint '{path}' does not match this run's trainable parameters "
                        f"(missing {len(missing)}, e.g. {missing[0]}): was it made with another train_mode or rank?")
    wrong = [n for n, p in params.items() if tuple(weights[n].shape) != tuple(p.shape)]
    if wrong:
        raise UserError(f"checkpoint '{path}' does not match this run's trainable parameters ({wrong[0]} is "
                        f"{tuple(weights[wrong[0]].shape)} there, {tuple(params[wrong[0]].shape)} here): was it made "
                        "with another rank or train_mode?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    if ema is not None and (path / "ema.safetensors").is_file():
        for name, tensor in _load_tensors(path / "ema.safetensors").items():
            ema[name].copy_(tensor)
    optimizer.load_state_dict(_load_state(path, "optimizer"))
    lr_scheduler.load_state_dict(_load_state(path, "scheduler"))
    return state


def load_sharded_checkpoint(path: Path, *, load_shards, lr_scheduler, method: str | None = None) -> dict:
    """Restore a checkpoint of a sharded run: `load_shards(path)` (collective) restores weights, optimizer and any
    EMA/teacher; the scheduler state is read here. Returns the saved state (global_step, ...)."""
    state = read_state(path)
    if method is not None and state.get("method", method) != method:
        raise UserError(f"checkpoint '{path}' was written by a method={state['method']} run, and this run is "
                        f"method={method}: resume it with the same method, or use another output_dir")
    if not state.get("sharded"):
        raise UserError(f"checkpoint '{path}' holds whole weights (a DDP or 1-process run), and this run is sharded "
                        "(FSDP): resume it launched the way it was written (e.g. configs/accelerate/ddp.yaml)")
    load_shards(path)
    lr_scheduler.load_state_dict(_load_state(path, "scheduler"))
    return state
