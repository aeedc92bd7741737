"""What made a folder of samples, read from its manifest: one short line per folder for the report's columns."""

from __future__ import annotations

import json
from pathlib import Path

# Manifest settings shown, in this order, with the name the report gives them.
_SHOWN = (("model", "model"), ("lora", "LoRA"), ("negative_model", "negative"), ("npo_alpha", "alpha"),
          ("npo_beta", "beta"), ("guidance_scale", "guidance"), ("num_inference_steps", "steps"),
          ("scheduler", "scheduler"))


def folder_provenance(folder: str | Path) -> str:
    """"model toy, LoRA runs/x, guidance 7.5, steps 20, ..." from the `settings` of a folder's manifest rows.

    A setting that differs between rows is shown as "mixed"; one no row records is left out. A folder without a
    readable manifest gives "" (the evaluation itself reports such folders)."""
    path = Path(folder) / "manifest.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        settings = [json.loads(line).get("settings") or {} for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return ""
    parts = []
    for key, name in _SHOWN:
        values = {json.dumps(s.get(key), sort_keys=True) for s in settings if key in s}
        if not values:
            continue
        if len(values) > 1:
            parts.append(f"{name} mixed")
            continue
        value = json.loads(values.pop())
        if value is not None:
            parts.append(f"{name} {value}")
    return ", ".join(parts)
