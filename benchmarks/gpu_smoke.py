"""GPU smoke benchmark: a few training steps of each method at the papers' resolution (SD1.5 512 px, SDXL 1024 px)
with the real weights, s/step and peak memory per method, MaPO against DPO, and `diffalign plan`'s prediction beside
the measured peak.

    HF_HOME=... .venv/bin/python benchmarks/gpu_smoke.py                      # SD1.5 and SDXL, every method, LoRA
    .venv/bin/python benchmarks/gpu_smoke.py --families sd15 --train-mode full --gradient-checkpointing
    .venv/bin/python benchmarks/gpu_smoke.py --sd15 /path/to/stable-diffusion-v1-5 --steps 10 --batch 2

Without a CUDA device it says so and exits 0 (that is what it does on the machine the project is developed on:
benchmarks/RESULTS.md). `--device cpu` with small local pipelines (`--sd15 DIR --sdxl DIR --resolution 64`) runs the
same code on the CPU, to check it without a GPU.

Per method and family: the weights are loaded once per family (bf16 frozen weights by default, as `mixed_precision:
bf16` stores them), the method's network prepared as `diffalign train` does (training/loop.py `_prepare_network`,
the method's recipe, AdamW), the prompt embeddings and latents made once (random pixels through the VAE: the
latent cache's work), then `--steps` optimizer steps under autocast. s/step is the median of the steps after the
first; the peak is `torch.cuda.max_memory_allocated` over the steps (what `diffalign plan` predicts, less the CUDA
context it keeps in reserve).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAPER_RESOLUTION = {"sd15": 512, "sdxl": 1024}
DEFAULT_MODELS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
METHODS = ("dpo", "mapo", "npo", "sft", "selfnpo")
GB = 2 ** 30


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="sd15,sdxl")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sd15", default=DEFAULT_MODELS["sd15"], help="SD1.5 pipeline: hub id or local folder")
    p.add_argument("--sdxl", default=DEFAULT_MODELS["sdxl"], help="SDXL pipeline: hub id or local folder")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per method (the first is not timed)")
    p.add_argument("--batch", type=int, default=1, help="pairs (samples for sft/selfnpo) per step")
    p.add_argument("--resolution", type=int, default=None, help="default: the paper's (512 SD1.5, 1024 SDXL)")
    p.add_argument("--train-mode", default="lora", choices=("lora", "full"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16", "no"))
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here (torch sees none): skipped. Run it on a GPU machine with the real "
              "weights (see benchmarks/RESULTS.md).")
        return 0
    rows = []
    for fam in args.families.split(","):
        rows += run_family(fam.strip(), args, torch)
    print_table(rows, args)
    return 0


def run_family(fam: str, args, torch) -> list[dict]:
    from diffalign.models import load_family
    from diffalign.training.setup import frozen_weight_dtype

    res = args.resolution or PAPER_RESOLUTION[fam]
    path = getattr(args, fam)
    dtype = frozen_weight_dtype(args.mixed_precision)
    device = torch.device(args.device)
    base = load_family(path, dtype=dtype)
    base.to(device)
    n = 2 * args.batch
    with torch.no_grad():
        cond = base.encode_prompts([f"a photo of a cat, number {i}" for i in range(n)])
        pixels = torch.rand(n, 3, res, res, device=device) * 2 - 1
        latents = base.encode_images(pixels)
    pristine = copy.deepcopy(base.unet).cpu()  # each method starts from the base weights
    rows = []
    for method in args.methods.split(","):
        base.unet = copy.deepcopy(pristine).to(device)
        rows.append(run_method(fam, method.strip(), base, latents, cond, res, args, torch))
        base.unet = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_method(fam: str, method_name: str, family, latents, cond, res: int, args, torch) -> dict:
    import real_shapes

    from diffalign.training.loop import _prepare_network
    from diffalign.training.methods import get_method
    from diffalign.training.protocol import RunContext
    from diffalign.training.steps import make_optimizer

    device = torch.device(args.device)
    settings = dict(method=method_name, train_mode=args.train_mode, gc=args.gradient_checkpointing)
    cfg = real_shapes.make_config(settings, res)
    cfg.train_batch_size, cfg.mixed_precision = args.batch, args.mixed_precision
    method = get_method(cfg.method)
    keys = method.keys(cfg)
    reference = _prepare_network(cfg, family, method.needs_reference(keys))
    named = {k: p for k, p in family.unet.named_parameters() if p.requires_grad}
    recipe = method.recipe(RunContext(cfg, method, keys, family, res, named, reference, device, (0, 1), lambda m: None))
    batch = real_shapes.make_batch(cfg, family, latents, cond, args.batch, torch)
    params = list(named.values())
    optimizer, _ = make_optimizer(cfg, params, 1)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(step)
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            loss = recipe.step(batch, gen).losses.mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_update()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    predicted = planned(fam, cfg, method, keys, args, res)
    del optimizer, recipe, reference
    return dict(family=fam, method=method_name, resolution=res, seconds=statistics.median(times[1:] or times),
                peak=peak, planned=predicted, loss=float(loss.detach()))


def planned(fam: str, cfg, method, keys, args, res: int) -> float:
    """`diffalign plan`'s tensors total for this step (its CUDA reserve left out: max_memory_allocated has none)."""
    from diffalign.planning.architectures import architecture
    from diffalign.planning.memory import Setting, plan

    s = Setting(architecture(fam), method=method.name, train_mode=cfg.train_mode, rank=cfg.rank,
                gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=args.mixed_precision,
                optimizer="adamw", batch=args.batch, resolution=res, needs_reference=method.needs_reference(keys))
    return plan(s).total


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.train_mode}, batch {args.batch}, {args.mixed_precision}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.steps} steps (median of all but the first)\n")
    print("| family | method | px | s/step | peak GiB (measured) | planned GiB | planned / measured |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['method']} | {r['resolution']} | {r['seconds']:.3f} | {r['peak'] / GB:.2f} | "
              f"{r['planned'] / GB:.2f} | {r['planned'] / r['peak']:.2f} |")
    for fam in sorted({r["family"] for r in rows}):
        by = {r["method"]: r for r in rows if r["family"] == fam}
        if "mapo" in by and "dpo" in by:
            m, d = by["mapo"], by["dpo"]
            print(f"\n{fam}: MaPO / DPO time per step {m['seconds'] / d['seconds']:.2f}, peak memory "
                  f"{m['peak'] / d['peak']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
