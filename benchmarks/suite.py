"""Every speed benchmark in one command: their tables, then each target with its measured value and PASS/MISS.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/suite.py            # full: about 10-15 minutes on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/suite.py --quick    # rough figures in about 3 minutes

Sections (each ratio measured side by side in one process, configurations interleaved round by round):
1. `step_cost.py`: one training step per method (DPO, MaPO, SFT with pixels and with the latent cache;
   Self-NPO), against the plain diffusers-style loop of `plain_loop.py` at equal batch, on a tiny and a small
   UNet; peak memory per configuration; where a DPO step's time goes; in the full run also channels_last and
   torch_compile (regional) on the small UNet.
2. `guidance_cost.py`: sampling per image, plain CFG against negative-branch (NPO) guidance, fast one-call path
   and two calls.
3. `selfnpo_cost.py`: a Self-NPO step from images and from noise against a DPO step.

Targets (PASS when measured <= target): MaPO step <= 0.75x DPO; cached step faster than uncached; our DPO
step faster than the plain loop at equal batch; with user defaults (use_cache: auto, so cached) our DPO step
<= 0.75x and our MaPO step <= 0.5x the plain loop's DPO step; compiled (torch_compile) / eager step <= 0.8x;
NPO-guided sampling <= 1.05x plain CFG with the same positive LoRA; a data-free Self-NPO step <= 2x a DPO step.
On a machine busy with other jobs the figures, --quick ones above all, are only rough.
The effect benchmarks (toy_effects.py, selfnpo_effect.py) train models for many minutes and run separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guidance_cost  # noqa: E402
import selfnpo_cost  # noqa: E402
import step_cost  # noqa: E402


def _defaults(module, quick: bool, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_args(parser, quick)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def passes(value: float, limit: float) -> bool:
    """A limit of 1.00x means "faster than": it must be beaten, not matched."""
    return value < limit if limit == 1.0 else value <= limit


def targets_table(rows: list[tuple[str, float, float]]) -> str:
    lines = ["| target | measured | limit | result |", "|---|---|---|---|"]
    for claim, value, limit in rows:
        bound = "< 1.00x (faster)" if limit == 1.0 else f"<= {limit:.2f}x"
        lines.append(f"| {claim} | {value:.2f}x | {bound} | {'PASS' if passes(value, limit) else 'MISS'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches and fewer rounds; memory on the small UNet "
                    "only; no torch.compile")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every benchmark")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                    help="channels_last and torch.compile on the small UNet (default: on in the full run; compiling "
                         "takes minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = (not args.quick) if args.variants is None else args.variants
    started, load0 = time.time(), os.getloadavg()[0]
    out = [f"# diffalign benchmark suite{' (--quick)' if args.quick else ''}", "",
           f"torch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPU(s), "
           f"1-min load average {load0:.2f} at start.", ""]
    targets: list[tuple[str, float, float]] = []

    step_args = _defaults(step_cost, args.quick, threads=args.threads, memory=not args.no_memory, variants=variants,
                          memory_models="small" if args.quick else "tiny,small", variant_models="small")
    text, rows = step_cost.run(step_args)
    out += ["## Training step (step_cost.py)", "", text, ""]
    targets += [(claim, value, limit) for claim, value, limit, _ in rows]

    g = _defaults(guidance_cost, args.quick)
    from diffalign.toy.paths import toy_model_path

    res = guidance_cost.measure(str(g.model or toy_model_path()), g.batch, g.steps, g.reps, g.rank)
    out += ["## Sampling per image (guidance_cost.py)", "",
            f"Toy model, batch {g.batch}, {g.steps} steps, {g.reps} rounds, random rank-{g.rank} LoRAs.", "",
            guidance_cost.table(res), ""]
    targets += guidance_cost.target_rows(res)

    s = _defaults(selfnpo_cost, args.quick)
    sres = selfnpo_cost.measure(s.batch, s.reps, s.warmup)
    out += ["## Self-NPO step (selfnpo_cost.py)", "", f"Toy model, batch {s.batch}, {s.reps} rounds.", "",
            selfnpo_cost.table(sres), ""]
    targets += selfnpo_cost.target_rows(sres)

    out += ["## Targets", "", targets_table(targets), "",
            f"Wall time {time.time() - started:.0f} s; 1-min load average {load0:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end."]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
