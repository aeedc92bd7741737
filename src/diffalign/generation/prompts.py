"""Prompt sets: one prompt a line, or JSONL with a `prompt` field."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def read_prompts(path: str | Path) -> list[str]:
    """Read a prompts file. Blank lines are skipped; in JSONL every line must carry a string `prompt`.

    An empty prompt is allowed in JSONL (`{"prompt": ""}`), the unconditional case.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file '{path}' does not exist: pass a text file (one prompt a line) or JSONL with a 'prompt' field")
    lines = path.read_text(encoding="utf-8").splitlines()
    is_jsonl = path.suffix == ".jsonl" or any(line.lstrip().startswith("{") for line in lines[:1])
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be an object with a 'prompt' field") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{number}: no string 'prompt' field in this JSON line")
        prompts.append(row["prompt"])
    if not prompts:
        raise UserError(f"prompts file '{path}' holds no prompts")
    return prompts
