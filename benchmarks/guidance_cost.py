"""Per-image cost of NPO-guided sampling against plain CFG and against the two-call approach, side by side.

Configurations, all on the toy SD model in one process:
- `cfg`: plain classifier-free guidance of the base pipeline (one UNet call per step on the [uncond; cond] batch);
- `cfg+lora`: plain CFG with the positive LoRA loaded (what a user runs without NPO);
- `npo-fast`: negative-branch CFG, positive LoRA + NPO LoRA composed, one mixed-adapter call per step;
- `npo-2call`: the same guidance with a second merged UNet and two calls per step (what a full-UNet offset costs).
Repetitions go round-robin with the order rotated each round, so machine-load drift hits all alike; ratios are
to `cfg`, per round, then the median. LoRAs are random (rank `--rank`, B ~ 0.1 N(0,1)): cost does not depend
on their values.

Run: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_cost.py [--batch 4 --steps 20 --reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a red circle", "a small blue square, striped", "a green triangle", "a large yellow diamond, outlined"]


def make_lora(model: str, out: Path, rank: int, seed: int) -> Path:
    from diffalign.models import load_family

    family = load_family(model)
    family.add_lora(rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in family.unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    family.save_lora(out)
    return out


def build(model: str, name: str, pos: Path, neg: Path):
    from diffalign.guidance import attach_negative_guidance
    from diffalign.models import load_lora_into_pipeline, load_pipeline

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    if name == "cfg+lora":
        load_lora_into_pipeline(pipe, pos)
    elif name == "npo-fast":
        attach_negative_guidance(pipe, negative=neg, positive=pos)
    elif name == "npo-2call":
        attach_negative_guidance(pipe, negative=neg, positive=pos, force_two_calls=True)
    return pipe


def unet_modules(pipe):
    unet = pipe.unet
    return [unet.positive, unet.negative] if getattr(unet, "negative", None) is not None else [getattr(unet, "positive", unet)]


def run(pipe, batch: int, steps: int) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    start = time.perf_counter()
    with torch.no_grad():
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens, output_type="np")
    return (time.perf_counter() - start) / batch


def main() -> int:
    from diffalign.toy.paths import toy_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="SD pipeline folder (default: the toy model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    model = str(args.model or toy_model_path())
    names = ["cfg", "cfg+lora", "npo-fast", "npo-2call"]
    with tempfile.TemporaryDirectory() as tmp:
        pos = make_lora(model, Path(tmp) / "pos", args.rank, 1)
        neg = make_lora(model, Path(tmp) / "neg", args.rank, 2)
        pipes = {n: build(model, n, pos, neg) for n in names}
    calls = {}
    for n, pipe in pipes.items():
        count = [0]
        handles = [m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for m in unet_modules(pipe)]
        run(pipe, args.batch, 2)  # warm-up, and UNet calls per step
        for h in handles:
            h.remove()
        calls[n] = count[0] / 2
    times = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(run(pipes[n], args.batch, args.steps))
        print(f"round {r + 1}/{args.reps} done", file=sys.stderr, flush=True)
    print(f"model={model} batch={args.batch} steps={args.steps} reps={args.reps} rank={args.rank} "
          f"torch_threads={torch.get_num_threads()}")
    print("| configuration | UNet calls / step | s / image (median) | ratio to plain CFG (median of rounds) |")
    print("|---|---|---|---|")
    for n in names:
        ratio = statistics.median(t / c for t, c in zip(times[n], times["cfg"]))
        print(f"| {n} | {calls[n]:g} | {statistics.median(times[n]):.4f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
