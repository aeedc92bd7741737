"""Resuming with a changed config (issue 22, defect 4).

A resumed run continues the weights, optimizer and data order of the run in its folder. Keys that define what is
trained and on what (the method, the model, the LoRA shape, the train mode, the data) cannot change: a different
rank failed mid-copy with a RuntimeError, a different dataset was accepted silently. Those are refused, naming
each difference. Keys that may change (learning rate, beta, batch size, ...) are allowed, logged, and recorded
with the step they apply from in `config_history.jsonl`, so `config.yaml` (rewritten with the config of the
latest start) is never mistaken for what the whole run used.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

FIXED = ("method", "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant",
         "train_mode", "rank", "lora_alpha", "lora_target_modules", "use_ema", "mapo_preset", "npo_objective",
         "selfnpo_start", "dataset_name", "dataset_split_name", "caption_column", "image_columns", "label_columns",
         "ties", "min_image_size", "max_train_samples")
IGNORED = ("resume_from_checkpoint", "output_dir")
HISTORY = "config_history.jsonl"


def _show(value) -> str:
    return "none" if value is None else ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resume_changes(cfg, out: Path, checkpoint: Path | None) -> dict[str, list]:
    """{key: [saved, now]} of the keys that changed since the run's saved config.yaml (empty when not resuming or
    no config was saved); raises UserError when a key that cannot change did."""
    saved_path = Path(out) / "config.yaml"
    if checkpoint is None or not saved_path.is_file():
        return {}
    from ..config_loader import load_config

    try:
        saved = load_config(type(cfg), str(saved_path), [])
    except UserError as exc:
        raise UserError(f"cannot compare with the run's saved config ({exc}); restore {saved_path} or start a new "
                        "output_dir") from None
    changes = {}
    for key, now in cfg.to_dict().items():
        before = getattr(saved, key, None)
        if key in IGNORED or _show(before) == _show(now):
            continue
        changes[key] = [before, now]
    fixed = [k for k in FIXED if k in changes]
    if fixed:
        diff = "; ".join(f"{k}: {_show(changes[k][0])} in the run, {_show(changes[k][1])} now" for k in fixed)
        raise UserError(f"cannot resume {checkpoint} with a changed {', '.join(fixed)} ({diff}): these define what "
                        f"the run trains and on what; resume with the run's values (its {saved_path}) or start a "
                        "new output_dir")
    return changes


def record_changes(out: Path, changes: dict, step: int, log) -> None:
    """Main process: log the allowed changes and append them, with the step they apply from, to the history."""
    if not changes:
        return
    shown = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
    log(f"resuming at step {step} with changed settings: {shown} (recorded in {HISTORY})")
    with (Path(out) / HISTORY).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"from_step": step, "changed": changes}, default=str) + "\n")
