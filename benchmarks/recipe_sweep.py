"""Sweep a toy training recipe over a grid of settings and measure each result (issue 16, section 4).

Recipes are chosen on the *training* prompts (the 16 "a {colour} {shape}" prompts the pairs were made from,
seeds 100.. so the samples are not the pairs' own); the held-out prompts are only measured once a recipe is
written into `configs/toy_*.yaml`. Every run starts from a base config and overrides the grid's keys:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_sweep.py \
        --config configs/toy_mapo.yaml --data runs/pairs/style_filtered --out runs/sweeps/style_mapo \
        --grid learning_rate=1e-4,3e-4 --grid max_train_steps=150,300 --grid mapo_preset=official,paper

Measured per run at guidance 7.5, 20 DDIM steps: the share of samples the judge reads as striped, shape and
colour fidelity (with the paired difference to the base on the same prompts and seeds) and clarity. A finished
run (its `train_report.json` exists) is measured again but not retrained. Results go to `results.jsonl`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import yaml

from diffalign.data.prompts import toy_prompts
from diffalign.demo import split_prompts
from diffalign.evaluation import get_reward
from diffalign.models import load_lora_into_pipeline, load_pipeline
from diffalign.toy.fidelity import sample_images
from diffalign.toy.paths import toy_model_path


def parse_value(text: str):
    """A command-line value as YAML would read it, except that "1e-4" is a float (YAML 1.1 reads a string)."""
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return yaml.safe_load(text)


def measure(judge, images, prompts) -> dict[str, np.ndarray]:
    d = judge.details(images, prompts)
    return {"fidelity": (d["shape_correct"] * d["colour_correct"]).float().numpy(),
            "striped": (d["style_striped"] > 0.5).float().numpy(),
            "clarity": judge.score(images, [""] * len(images)).numpy()}


def summarise(m: dict, base: dict | None) -> dict:
    out = {}
    for k, v in m.items():
        out[k] = float(v.mean())
        if base is not None:
            diff = v - base[k]
            out[f"{k}_diff"] = float(diff.mean())
            out[f"{k}_diff_se"] = float(diff.std(ddof=1) / len(diff) ** 0.5)
    return out


def sample_model(lora: str | None, prompts, guidance: float, seed: int):
    pipe = load_pipeline(str(toy_model_path()))
    if lora:
        load_lora_into_pipeline(pipe, lora)
    return sample_images(pipe, prompts, guidance, seed=seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="base training config (YAML)")
    ap.add_argument("--data", default=None, help="dataset_name for every run")
    ap.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE fixed for every run (repeatable)")
    ap.add_argument("--prompts", choices=["train", "heldout"], default="train")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--seed", type=int, default=100, help="image i is seeded with seed + i")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = yaml.safe_load(Path(args.config).read_text())
    fixed = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    grid = [(k, [parse_value(x) for x in v.split(",")]) for k, v in (g.split("=", 1) for g in args.grid)]
    prompt_set = split_prompts()[0] if args.prompts == "train" else toy_prompts("heldout")
    prompts = [p for _ in range(args.repeats) for p in prompt_set]
    judge = get_reward("toy")

    base_m = measure(judge, sample_model(None, prompts, args.guidance, args.seed), prompts)
    rows = [{"run": "base", **summarise(base_m, None)}]
    print(f"base: {rows[0]}", flush=True)
    for values in itertools.product(*(v for _, v in grid)):
        combo = dict(zip((k for k, _ in grid), values))
        slug = "_".join(f"{k}-{v}" for k, v in {**fixed, **combo}.items()) or "default"
        run_dir = out / slug
        settings = {**base_cfg, **fixed, **combo, "output_dir": str(run_dir), "validation_steps": None,
                    "validation_prompts": None, "checkpointing_steps": 100_000, "report_to": "none"}
        if args.data:
            settings["dataset_name"] = args.data
        t0 = time.time()
        if not (run_dir / "train_report.json").exists():
            cfg = TrainConfig(**{k: v for k, v in settings.items() if v is not None or k == "dataset_name"})
            cfg.validate()
            train(cfg)
        seconds = time.time() - t0
        m = measure(judge, sample_model(str(run_dir), prompts, args.guidance, args.seed), prompts)
        row = {"run": slug, **combo, **fixed, "train_seconds": round(seconds, 1), **summarise(m, base_m)}
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({**row, "prompts": args.prompts, "repeats": args.repeats, "seed": args.seed,
                                "guidance": args.guidance, "data": args.data, "config": args.config}) + "\n")
        print(f"{slug}: striped {row['striped']:.3f} fidelity {row['fidelity']:.3f} "
              f"({row['fidelity_diff']:+.3f} ± {row['fidelity_diff_se']:.3f}) clarity {row['clarity']:.3f} "
              f"[{seconds:.0f} s]", flush=True)
    print("\n| run | striped | fidelity (diff ± s.e.) | clarity |\n|---|---|---|---|")
    for r in rows:
        fid = f"{r['fidelity']:.3f}"
        if "fidelity_diff" in r:
            fid += f" ({r['fidelity_diff']:+.3f} ± {r['fidelity_diff_se']:.3f})"
        print(f"| {r['run']} | {r['striped']:.3f} | {fid} | {r['clarity']:.3f} |")


if __name__ == "__main__":
    main()
