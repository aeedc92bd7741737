"""`diffalign demo`: the toy world on CPU in about a minute.

Today it samples the shipped toy model at three guidance scales on fixed prompts and seeds, lets the judge
score prompt fidelity, and writes a picture grid and a table. The full loop (pairs, MaPO/DPO, Self-NPO,
negative guidance, report) joins it as those parts land.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .fsutil import ensure_writable_dir

GUIDANCE_SCALES = (1.0, 3.0, 7.5)


def _grid(images: np.ndarray, columns: int, scale: int = 3) -> Image.Image:
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = img
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


def run_demo(out_dir: str | Path = "demo_out", repeats: int = 4, steps: int = 20) -> dict:
    from .evaluation import get_reward
    from .models import load_pipeline
    from .toy.paths import toy_model_path
    from .toy.fidelity import FidelityResult, fidelity_prompts, format_table, sample_images

    out = ensure_writable_dir(out_dir)
    pipe = load_pipeline(str(toy_model_path()))
    judge = get_reward("toy")
    prompts = fidelity_prompts(repeats)
    results, rows = [], []
    for g in GUIDANCE_SCALES:
        images = sample_images(pipe, prompts, g, steps=steps, seed=0)
        d = judge.details(images, prompts)
        shape_ok, colour_ok = d["shape_correct"].float(), d["colour_correct"].float()
        results.append(FidelityResult(g, len(prompts), shape_ok.mean().item(), colour_ok.mean().item(),
                                      (shape_ok * colour_ok).mean().item()))
        rows.append(images[:24])  # the first sample of every prompt
        _grid(images[:24], columns=6).save(out / f"samples_guidance_{g:g}.png")
    _grid(np.concatenate(rows), columns=24).save(out / "guidance_grid.png")
    table = format_table(results)
    (out / "fidelity.json").write_text(json.dumps([r.__dict__ for r in results], indent=2))
    (out / "fidelity.md").write_text(
        "Judge fidelity of the toy base model (prompts 'a {colour} {shape}', "
        f"{len(prompts)} samples per scale, {steps} DDIM steps, seeds 0..{len(prompts) - 1}).\n\n" + table + "\n"
    )
    print(table)
    print(f"\npictures: {out / 'guidance_grid.png'} (rows: guidance {', '.join(f'{g:g}' for g in GUIDANCE_SCALES)})")
    return {"results": results, "out": out}
