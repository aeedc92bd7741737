"""`diffalign demo`: the whole loop on the shipped toy model, on a CPU, in a few minutes.

Stages (each in its own folder under `--out`; a finished stage is reused when its settings and the stages it
builds on are unchanged, so a re-run after an interruption goes on where it stopped):

1. `pairs`    toy Pick-Style pairs made by the model itself: the chosen image sampled from "{prompt}, striped",
              the rejected from "{prompt}", same seed; the stored caption names only the content.
2. `mapo`     a MaPO LoRA on those pairs (no reference model).
3. `dpo`      a Diffusion-DPO LoRA on the same pairs (the method users compare against).
4. `selfnpo`  a Self-NPO negative LoRA learned from the model itself: prompts only, no pairs, no labels.
5. `samples`  held-out prompts (colour/shape combinations no stage trained on) x fixed seeds, for: base,
              base + Self-NPO in the negative branch, MaPO, MaPO + Self-NPO, DPO.
6. `report`   `diffalign evaluate` on those folders against base: the toy judge's shape+colour correctness,
              its prompt-fidelity score, clarity (how clearly an image shows some valid scene: the toy's
              stand-in for the papers' quality rewards) and the probability that an image is striped (the
              Pick-Style target).

Every setting below was fixed before the demo's results were looked at; they are the toy recipes of
`configs/` (150 steps each), which fit the time budget on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .fsutil import ensure_writable_dir

GUIDANCE = 7.5
STEPS = 20  # sampling steps
SAMPLES_PER_PROMPT = 8  # held-out evaluation: 8 prompts x 8 seeds per model
PAIRS_PER_PROMPT = 8  # 16 training prompts x 8 seeds = 128 Pick-Style pairs
STYLE = "striped"
REWARDS = ("toy:term=shape_colour_correct", "toy", "toy:term=clarity", f"toy:term=style_{STYLE}")
LORA = dict(train_mode="lora", rank=8, learning_rate=1e-4, train_batch_size=8, gradient_accumulation_steps=1,
            lr_scheduler="constant", mixed_precision="no", report_to="none", resolution=32,
            checkpoints_total_limit=1, validation_prompts=["a red circle", "a blue square"],
            validation_num_inference_steps=STEPS, validation_guidance_scale=GUIDANCE)
TRAIN = {
    "mapo": dict(method="mapo", mapo_preset="official", max_train_steps=150, checkpointing_steps=75, validation_steps=150),
    "dpo": dict(method="dpo", beta=2000.0, max_train_steps=150, checkpointing_steps=75, validation_steps=150),
    "selfnpo": dict(method="selfnpo", dataset_name="toy", selfnpo_start="noise", teacher_ema_decay=0.99,
                    teacher_guidance=-1.0, ddim_grid=25, teacher_steps=5, selfnpo_loss="pseudo_huber", huber_c=1e-3,
                    adam_weight_decay=1e-3, max_train_steps=150, checkpointing_steps=75, validation_steps=150),
}
# name -> (positive LoRA stage or None, use the Self-NPO negative)
MODELS = {
    "base": (None, False),
    "base+selfnpo": (None, True),
    "mapo": ("mapo", False),
    "mapo+selfnpo": ("mapo", True),
    "dpo": ("dpo", False),
}


def split_prompts() -> tuple[list[str], list[str]]:
    """Training prompts ("a {colour} {shape}" except the held-out combinations) and the held-out ones."""
    from .data.prompts import toy_prompts
    from .toy.world import COLOUR_NAMES, SHAPES, caption

    heldout = toy_prompts("heldout")
    train = [caption(shape=s, colour=c) for c in COLOUR_NAMES for s in SHAPES if caption(shape=s, colour=c) not in heldout]
    return train, heldout


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class Stage:
    name: str
    title: str
    settings: dict
    run: Callable[[Path], dict]
    needs: tuple[str, ...] = ()
    fingerprint: str = field(default="", init=False)


MARKER = "stage.json"


def _fingerprint(settings: dict, upstream: list[str]) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_stages(stages: list[Stage], out: Path, log=print) -> dict[str, dict]:
    """Run each stage whose folder has no matching `stage.json`; reuse the others. Returns summaries."""
    done: dict[str, Stage] = {}
    summaries = {}
    for i, stage in enumerate(stages, 1):
        stage.fingerprint = _fingerprint(stage.settings, [done[n].fingerprint for n in stage.needs])
        folder = out / stage.name
        marker = folder / MARKER
        if marker.exists():
            record = json.loads(marker.read_text())
            if record.get("fingerprint") == stage.fingerprint:
                log(f"[{i}/{len(stages)}] {stage.title}: reused ({folder}, took {record['seconds']:.0f} s when made)")
                summaries[stage.name] = {**record["summary"], "seconds": record["seconds"], "reused": True}
                done[stage.name] = stage
                continue
        if folder.exists():  # unfinished, or made with other settings: start it again
            shutil.rmtree(folder)
        log(f"[{i}/{len(stages)}] {stage.title} ...")
        start = time.perf_counter()
        summary = stage.run(folder)
        seconds = time.perf_counter() - start
        marker.write_text(json.dumps({"fingerprint": stage.fingerprint, "seconds": seconds, "summary": summary}, indent=2))
        log(f"[{i}/{len(stages)}] {stage.title}: done in {seconds:.0f} s")
        summaries[stage.name] = {**summary, "seconds": seconds, "reused": False}
        done[stage.name] = stage
    return summaries


# ------------------------------------------------------------------------------------------ stage bodies
def _load_toy():
    from .models import load_pipeline
    from .toy.paths import toy_model_path

    return load_pipeline(str(toy_model_path()))


def _make_pairs(folder: Path) -> dict:
    from .generation import GenerationSettings
    from .generation.pairs import make_pairs

    train_prompts, _ = split_prompts()
    settings = GenerationSettings(guidance_scale=GUIDANCE, num_inference_steps=STEPS, seed=0,
                                  num_images_per_prompt=PAIRS_PER_PROMPT, batch_size=32)
    report = make_pairs(_load_toy(), train_prompts, folder / "pairs.parquet", settings,
                        templates=("{prompt}, " + STYLE, "{prompt}"), images_dir=folder / "images")
    return {"pairs": report.pairs, "summary": report.summary()}


def _train(method: str, pairs_dir: Path | None) -> Callable[[Path], dict]:
    def run(folder: Path) -> dict:
        from .training.config import TrainConfig
        from .training.loop import train

        settings = {**LORA, **TRAIN[method], "pretrained_model_name_or_path": "toy", "output_dir": str(folder), "seed": 0}
        if pairs_dir is not None:
            settings["dataset_name"] = str(pairs_dir / "pairs.parquet")
        cfg = TrainConfig(**settings)
        cfg.validate()
        train(cfg)
        report = json.loads((folder / "train_report.json").read_text())
        return {"steps": report.get("steps"), "train_seconds": report.get("seconds")}

    return run


def _sample(out: Path) -> Callable[[Path], dict]:
    def run(folder: Path) -> dict:
        from .generation import GenerationSettings, generate_to_folder
        from .guidance import attach_negative_guidance
        from .models import load_lora_into_pipeline

        _, heldout = split_prompts()
        settings = GenerationSettings(guidance_scale=GUIDANCE, num_inference_steps=STEPS, seed=0,
                                      num_images_per_prompt=SAMPLES_PER_PROMPT, batch_size=32)
        for name, (positive, negative) in MODELS.items():
            pipe = _load_toy()
            lora = str(out / positive) if positive else None
            if negative:
                attach_negative_guidance(pipe, negative=str(out / "selfnpo"), positive=lora, alpha=1.0, beta=1.0)
            elif lora:
                load_lora_into_pipeline(pipe, lora)
            settings.extra = {"model": "toy", "lora": lora, "negative_model": str(out / "selfnpo") if negative else None}
            generate_to_folder(pipe, heldout, folder / name, settings)
        return {"models": list(MODELS), "images_per_model": len(heldout) * SAMPLES_PER_PROMPT}

    return run


def _report(out: Path) -> Callable[[Path], dict]:
    def run(folder: Path) -> dict:
        from .evaluation.evaluate import evaluate_folders
        from .evaluation.report import format_table

        folders = {name: out / "samples" / name for name in MODELS}
        result = evaluate_folders(folders, list(REWARDS), folder, baseline="base")
        (folder / "table.txt").write_text(format_table(result) + "\n")
        return {"report": str(result.report_path)}

    return run


def build_stages(out: Path) -> list[Stage]:
    train_prompts, heldout = split_prompts()
    pair_settings = {"prompts": train_prompts, "per_prompt": PAIRS_PER_PROMPT, "style": STYLE, "guidance": GUIDANCE,
                     "steps": STEPS, "seed": 0}
    return [
        Stage("pairs", "toy Pick-Style pairs sampled from the model", pair_settings, _make_pairs),
        Stage("mapo", "MaPO LoRA on the pairs", {**LORA, **TRAIN["mapo"]}, _train("mapo", out / "pairs"), ("pairs",)),
        Stage("dpo", "Diffusion-DPO LoRA on the pairs", {**LORA, **TRAIN["dpo"]}, _train("dpo", out / "pairs"), ("pairs",)),
        Stage("selfnpo", "Self-NPO negative LoRA from prompts only", {**LORA, **TRAIN["selfnpo"]}, _train("selfnpo", None)),
        Stage("samples", "sampling held-out prompts with each model",
              {"prompts": heldout, "per_prompt": SAMPLES_PER_PROMPT, "guidance": GUIDANCE, "steps": STEPS,
               "models": {k: list(v) for k, v in MODELS.items()}},
              _sample(out), ("mapo", "dpo", "selfnpo")),
        Stage("report", "evaluation with the toy judge, report.html", {"rewards": list(REWARDS)}, _report(out), ("samples",)),
    ]


def run_demo(out_dir: str | Path = "demo_out") -> dict:
    from transformers.utils import logging as hf_logging

    # The toy pipeline has no image processor worth a warning ("requires torchvision"): keep the output readable.
    hf_logging.set_verbosity_error()
    out = ensure_writable_dir(out_dir)
    start = time.perf_counter()
    summaries = run_stages(build_stages(out), out)
    total = time.perf_counter() - start
    table = (out / "report" / "table.txt").read_text()
    print("\n" + table)
    print(f"held-out prompts x {SAMPLES_PER_PROMPT} seeds per model, guidance {GUIDANCE}, {STEPS} DDIM steps; "
          f"win rates against base on matched prompt and seed.")
    print(f"demo finished in {total / 60:.1f} min; report: {summaries['report']['report']}")
    return {"summaries": summaries, "out": out, "seconds": total}
