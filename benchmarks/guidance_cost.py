"""Per-image cost of NPO-guided sampling against plain CFG and against the two-call approach, side by side.

Configurations, all on the toy SD model in one process:
- `cfg`: plain classifier-free guidance of the base pipeline (one UNet call per step on the [uncond; cond] batch);
- `cfg+lora`: plain CFG with the positive LoRA loaded (what a user runs without NPO);
- `cfg+fused`: plain CFG with the positive LoRA fused into the weights (`pipe.fuse_lora()`, the cheapest way to
  sample with it);
- `npo-fast`: negative-branch CFG, the positive LoRA folded into the weights and the remaining negative offset
  `(alpha-1)*eta + beta*delta` as an adapter on the negative half only, one call per step;
- `npo-2call`: the same guidance with a second merged UNet and two calls per step (what a full-UNet offset costs).
Repetitions go round-robin with the order rotated each round, so machine-load drift hits all alike; ratios are
to `cfg`, per round, then the median. LoRAs are random (rank `--rank`, B ~ 0.1 N(0,1)): cost does not depend
on their values.

Run: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_cost.py [--quick] [--batch 4 --steps 20 --reps 5]
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
    if name in ("cfg+lora", "cfg+fused"):
        load_lora_into_pipeline(pipe, pos)
        if name == "cfg+fused":
            pipe.fuse_lora()
            pipe.unload_lora_weights()
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


def measure(model: str, batch: int, steps: int, reps: int, rank: int) -> dict:
    """Per-image times of every configuration, round-robin; returns {"times", "calls"}."""
    names = ["cfg", "cfg+lora", "cfg+fused", "npo-fast", "npo-2call"]
    with tempfile.TemporaryDirectory() as tmp:
        pos = make_lora(model, Path(tmp) / "pos", rank, 1)
        neg = make_lora(model, Path(tmp) / "neg", rank, 2)
        pipes = {n: build(model, n, pos, neg) for n in names}
    calls = {}
    for n, pipe in pipes.items():
        count = [0]
        handles = [m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for m in unet_modules(pipe)]
        run(pipe, batch, 2)  # warm-up, and UNet calls per step
        for h in handles:
            h.remove()
        calls[n] = count[0] / 2
    times = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(run(pipes[n], batch, steps))
        print(f"round {r + 1}/{reps} done", file=sys.stderr, flush=True)
    return {"times": times, "calls": calls}


def ratio(times: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def table(res: dict) -> str:
    times = res["times"]
    lines = ["| configuration | UNet calls / step | s / image (median) | ratio to plain CFG (median of rounds) |",
             "|---|---|---|---|"]
    for n in times:
        lines.append(f"| {n} | {res['calls'][n]:g} | {statistics.median(times[n]):.4f} | {ratio(times, n, 'cfg'):.2f} |")
    return "\n".join(lines)


def target_rows(res: dict) -> list[tuple[str, float, float]]:
    """(claim, measured, limit): NPO-guided sampling against plain CFG, per image."""
    t = res["times"]
    return [("NPO-guided sampling (fast path) / plain CFG of the base model, per image", ratio(t, "npo-fast", "cfg"), 1.15),
            ("NPO-guided sampling (fast path) / plain CFG with the same positive LoRA, per image",
             ratio(t, "npo-fast", "cfg+lora"), 1.05)]


def add_args(ap: argparse.ArgumentParser, quick: bool = False) -> None:
    ap.add_argument("--model", default=None, help="SD pipeline folder (default: the toy model)")
    ap.add_argument("--batch", type=int, default=2 if quick else 4)
    ap.add_argument("--steps", type=int, default=10 if quick else 20)
    ap.add_argument("--reps", type=int, default=3 if quick else 5)
    ap.add_argument("--rank", type=int, default=8)


def main() -> int:
    from diffalign.toy.paths import toy_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch, fewer steps and rounds (rough figures)")
    add_args(ap, "--quick" in sys.argv)
    args = ap.parse_args()
    model = str(args.model or toy_model_path())
    res = measure(model, args.batch, args.steps, args.reps, args.rank)
    print(f"model={model} batch={args.batch} steps={args.steps} reps={args.reps} rank={args.rank} "
          f"torch_threads={torch.get_num_threads()}")
    print(table(res))
    for claim, value, limit in target_rows(res):
        print(f"{'PASS' if value <= limit else 'MISS'}  {claim}: {value:.2f}x (target <= {limit:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
