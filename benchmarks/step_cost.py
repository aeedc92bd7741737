"""Cost of one training step per method, measured side by side in one run: time, peak memory, UNet passes.

Configurations: LoRA (DPO with adapters off as reference, MaPO, SFT) and full fine-tune (DPO with a frozen
reference copy, MaPO). A "step" is what the training loop does per optimizer update: noise and t, the
recipe's forward pass(es), backward, gradient clipping, AdamW step, zero_grad.

- Time: every configuration lives in this one process; after warm-up, repetitions go round-robin (with the
  order rotated each round) so machine-load drift hits all configurations alike. Ratios are per round.
- Peak memory: one fresh subprocess per configuration. Baseline = resident set (VmRSS) after the model is
  loaded and the batch built; then the kernel's peak-RSS mark is reset (`/proc/self/clear_refs` <- 5, which
  also resets `getrusage().ru_maxrss`) and the peak (VmHWM) after setup and a few steps is read. Peak RSS is
  what torch's CPU tensors actually occupy (they bypass Python's allocator, so tracemalloc cannot see them;
  torch.cuda memory stats are GPU-only; sampling psutil's current RSS can miss the peak). It also counts
  allocator slack, which a user pays too. Where clear_refs is not writable, ru_maxrss (peak since process
  start) is used and the delta may hide a training peak below the load transient (flagged in the output).
- Data throughput: `train()` on a toy Pick-a-Pic parquet, latent cache off vs on (cache built beforehand).

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_cost.py [--batch 8 --reps 20 --model PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = [("dpo", "lora"), ("mapo", "lora"), ("sft", "lora"), ("dpo", "full"), ("mapo", "full")]
PROMPTS = ["a red circle", "a small blue square, striped", "a green triangle", "a large yellow diamond, outlined"]


def log(msg: str) -> None:
    print(f"[step_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- setups
def load(model: str, mode: str, rank: int):
    from diffalign.models import load_family
    from diffalign.toy.paths import resolve_model

    family = load_family(resolve_model(model))
    torch.manual_seed(0)
    if mode == "lora":
        family.add_lora(rank)
    return family


def make_batch(family, pairs: int):
    from diffalign.training.recipes import PairBatch

    res = family.default_resolution // family.vae_scale_factor
    shape = (pairs, family.unet.config.in_channels, res, res)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = family.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(pairs)])
    return PairBatch(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), cond, cond)


def make_step(family, method: str, mode: str, batch, beta: float):
    """A closure running one optimizer step, and the UNets it calls (policy, plus the frozen copy for full DPO)."""
    from diffalign.training.recipes import PreferenceRecipe, sample_noise_and_t

    ref = None
    if mode == "full":
        if method == "dpo":
            ref = copy.deepcopy(family.unet).requires_grad_(False).eval()
        family.enable_full_finetune()
    family.unet.train()
    recipe = PreferenceRecipe(family, method, beta=beta, ref_unet=ref)
    params = family.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-6)
    gen = torch.Generator().manual_seed(1)

    def step():
        noise, t = sample_noise_and_t(batch.latents_w.shape, family.num_train_timesteps, gen, family.device)
        recipe(batch, noise, t).losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, [family.unet] + ([ref] if ref is not None else [])


def unet_passes(step, unets) -> int:
    from diffalign.training.recipes import count_unet_calls

    with contextlib.ExitStack() as stack:
        counters = [stack.enter_context(count_unet_calls(unet)) for unet in unets]
        step()
    return sum(c["calls"] for c in counters)


# --------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_worker(args) -> None:
    """Subprocess: peak RSS increase of one configuration over the loaded-model baseline (prints RESULT json)."""
    import gc

    method, mode = args.memory_worker.split(":")
    torch.set_num_threads(args.threads)
    family = load(args.model, "none", args.rank)  # LoRA is part of the measured cost, added after the baseline
    batch = make_batch(family, args.batch)
    gc.collect()
    baseline = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    if mode == "lora":
        torch.manual_seed(0)
        family.add_lora(args.rank)
    step, _ = make_step(family, method, mode, batch, args.beta)
    for _ in range(args.memory_steps):
        step()
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps({"baseline_mb": baseline / 1024, "peak_mb": peak / 1024,
                                  "delta_mb": (peak - baseline) / 1024, "exact": exact}), flush=True)


def measure_memory(args) -> dict:
    out = {}
    for method, mode in CONFIGS:
        log(f"memory: fresh subprocess for {method} {mode}")
        cmd = [sys.executable, __file__, "--memory-worker", f"{method}:{mode}", "--model", args.model,
               "--batch", str(args.batch), "--rank", str(args.rank), "--beta", str(args.beta),
               "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"memory worker {method}:{mode} failed:\n{proc.stderr[-3000:]}")
        out[(method, mode)] = json.loads(line[len("RESULT "):])
    return out


# ----------------------------------------------------------------------------------------------- time
def measure_time(args) -> tuple[dict, dict]:
    steps, passes = {}, {}
    for method, mode in CONFIGS:
        # One family per config (they are small); a shared one would mix LoRA and full fine-tune modes.
        log(f"time: setting up {method} {mode}")
        family = load(args.model, mode, args.rank)
        step, unets = make_step(family, method, mode, make_batch(family, args.batch), args.beta)
        passes[(method, mode)] = unet_passes(step, unets)
        for _ in range(args.warmup):
            step()
        steps[(method, mode)] = step
    times = {key: [] for key in CONFIGS}
    for r in range(args.reps):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for key in order:
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)
        log(f"time: round {r + 1}/{args.reps} done (load avg {os.getloadavg()[0]:.2f})")
    return times, passes


# ------------------------------------------------------------------------------------------ data cache
def measure_cache(args, workdir: Path) -> dict:
    from diffalign.data import build_cache, load_pairs
    from diffalign.models import load_family
    from diffalign.toy.paths import resolve_model
    from diffalign.toy.render_pairs import write_pairs_parquet
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    parquet = write_pairs_parquet(workdir / "pairs.parquet", args.train_pairs)
    cache_dir = workdir / "cache"

    def cfg(use_cache: bool, run: int) -> TrainConfig:
        return TrainConfig(method=args.train_method, pretrained_model_name_or_path=args.model, dataset_name=str(parquet),
                           output_dir=str(workdir / f"run-{'cached' if use_cache else 'pixels'}-{run}"),
                           train_batch_size=args.batch, max_train_steps=args.train_steps, learning_rate=1e-6,
                           rank=args.rank, beta=args.beta if args.train_method == "dpo" else None,
                           report_to="none", use_cache=use_cache, cache_dir=str(cache_dir),
                           checkpointing_steps=args.train_steps + 1, seed=0)

    c = cfg(True, 0).validate()
    family = load_family(resolve_model(c.pretrained_model_name_or_path))
    pairs = load_pairs(c.dataset_name, split=c.dataset_split_name, caption_column=c.caption_column,
                       image_columns=tuple(c.image_columns), label_columns=tuple(c.label_columns), ties=c.ties,
                       strict=c.strict_data, max_samples=c.max_train_samples)
    log(f"cache: building the latent cache of {len(pairs)} pairs")
    t0 = time.perf_counter()
    build_cache(pairs, family, resolution=c.resolution or family.default_resolution, cache_dir=cache_dir, progress=False)
    build_s = time.perf_counter() - t0
    per_step = {False: [], True: []}
    for run, use_cache in enumerate([False, True, True, False][: 2 * args.train_repeats]):  # ABBA order
        log(f"cache: train() {args.train_steps} steps, use_cache={use_cache}")
        out = train(cfg(use_cache, run))
        report = json.loads((out / "train_report.json").read_text())
        per_step[use_cache].append(report["seconds"] / report["steps"])
    return {"pairs": len(pairs), "build_s": build_s, "pixels": per_step[False], "cached": per_step[True]}


# ---------------------------------------------------------------------------------------------- report
def fmt_spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"{q[0]:.2f}-{q[2]:.2f}"


def report(args, times, passes, memory, cache) -> str:
    lines = [f"Batch {args.batch} pairs (SFT: {args.batch} winners), LoRA rank {args.rank}, {args.reps} timed "
             f"rounds after {args.warmup} warm-up steps, torch {torch.__version__}, {args.threads} thread(s), "
             f"{os.cpu_count()} CPU(s).", "",
             "| method | mode | UNet passes/step | s/step mean (sd) | time vs DPO | per-round ratio IQR "
             "| peak RSS increase MB | memory vs DPO |", "|---|---|---|---|---|---|---|---|"]
    for method, mode in CONFIGS:
        ts, ref = times[(method, mode)], times[("dpo", mode)]
        spread = "-" if method == "dpo" else fmt_spread([a / b for a, b in zip(ts, ref)])
        mem = memory.get((method, mode))
        mem_cols = ("-", "-") if mem is None else (
            f"{mem['delta_mb']:.1f}{'' if mem['exact'] else ' (*)'}",
            f"{mem['delta_mb'] / memory[('dpo', mode)]['delta_mb']:.2f}x")
        lines.append(f"| {method} | {mode} | {passes[(method, mode)]} | {statistics.mean(ts):.3f} "
                     f"({statistics.stdev(ts):.3f}) | {statistics.mean(ts) / statistics.mean(ref):.2f}x "
                     f"| {spread} | {mem_cols[0]} | {mem_cols[1]} |")
    if memory:
        base = statistics.mean(m["baseline_mb"] for m in memory.values())
        lines += ["", f"Memory baseline (process RSS after model load, before LoRA/reference copy/optimizer): "
                      f"{base:.0f} MB on average; increases are peak VmHWM minus that baseline."]
        if not all(m["exact"] for m in memory.values()):
            lines.append("(*) peak from ru_maxrss since process start: clear_refs was not writable.")
    if cache:
        px, cc = statistics.mean(cache["pixels"]), statistics.mean(cache["cached"])
        saved = px - cc
        lines += ["", f"`train()` {args.train_method} LoRA, {args.train_steps} steps x batch {args.batch}, "
                      f"{cache['pairs']} toy pairs, runs in ABBA order ({len(cache['pixels'])} each):", "",
                  "| data path | s/step (runs) | vs uncached |", "|---|---|---|",
                  f"| pixels (use_cache=false) | {px:.3f} ({', '.join(f'{v:.3f}' for v in cache['pixels'])}) | 1.00x |",
                  f"| latent cache (use_cache=true) | {cc:.3f} ({', '.join(f'{v:.3f}' for v in cache['cached'])}) "
                  f"| {cc / px:.2f}x |", "",
                  f"Cache build (VAE + text encoding of {cache['pairs']} pairs, excluded above): {cache['build_s']:.2f} s"
                  + (f"; pays for itself after ~{cache['build_s'] / saved:.0f} steps." if saved > 0 else ".")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="'toy' or a diffusers pipeline folder (SD or SDXL)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--beta", type=float, default=2000.0, help="DPO beta (does not change the cost)")
    p.add_argument("--reps", type=int, default=20, help="timed round-robin rounds (one step per config each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per config before timing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps timings stable on a shared machine (an oversubscribed OpenMP "
                        "pool stalls)")
    p.add_argument("--memory-steps", type=int, default=4,
                   help="steps per memory subprocess (the peak still creeps up on steps 2-3)")
    p.add_argument("--train-steps", type=int, default=24, help="train() steps per cached/uncached run")
    p.add_argument("--train-pairs", type=int, default=96, help="toy pairs in the train() parquet")
    p.add_argument("--train-repeats", type=int, default=2, choices=(1, 2), help="runs per data path (2 = ABBA)")
    p.add_argument("--train-method", default="mapo", choices=("dpo", "mapo", "sft"))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        return memory_worker(args)

    torch.set_num_threads(args.threads)
    started, load0 = time.time(), os.getloadavg()[0]
    times, passes = measure_time(args)
    memory = {} if args.skip_memory else measure_memory(args)
    cache = None
    if not args.skip_train:
        with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
            cache = measure_cache(args, Path(tmp))
    print(report(args, times, passes, memory, cache))
    print(f"\nWall time {time.time() - started:.0f} s; 1-min load average {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end.")


if __name__ == "__main__":
    main()
