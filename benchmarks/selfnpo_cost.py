"""Cost of one Self-NPO training step against one Diffusion-DPO step, same model, same batch, one run.

A "step" is the full optimizer update: for DPO noise/t, the 2B policy pass, the reference pass (adapters off),
backward, AdamW; for Self-NPO the teacher's K DDIM steps plus its x0 estimate (no grad), the student pass,
backward, AdamW, the EMA update. Steps alternate DPO / Self-NPO (images) / Self-NPO (noise) / Self-NPO (noise,
`trace_teacher`: the teacher's calls replayed from traces) round by round so load drift hits all alike. UNet forward
calls per step are counted too (a replayed call is not a module call, so the traced row counts only the student's
and the one eager call of each trace check).

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/selfnpo_cost.py [--quick] [--batch 8 --reps 10 --threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffalign.models import load_family
from diffalign.toy.paths import toy_model_path
from diffalign.training.recipes import PairBatch, PreferenceRecipe, count_unet_calls
from diffalign.training.selfnpo import EmaTeacher, SelfNPOBatch, SelfNPORecipe

PROMPTS = ["a red circle", "a small blue square, striped", "a green triangle", "a large yellow diamond, outlined"]


def setup(kind: str, batch: int):
    family = load_family(str(toy_model_path()))
    torch.manual_seed(0)
    family.add_lora(8)
    named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(named.values(), lr=1e-5)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    cond = family.encode_prompts(prompts)
    latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    if kind == "dpo":
        recipe = PreferenceRecipe(family, "dpo", beta=5000.0)
        data = PairBatch(latents, latents.flip(0), cond, cond)

        def step(g):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (batch,), generator=g)
            return recipe(data, noise, t).losses.mean()
    else:
        start = kind.split("-")[1]
        teacher = EmaTeacher(family.unet, named, 0.999, separate_copy=False)
        recipe = SelfNPORecipe(family, teacher, start=start, guidance=-1.0, latent_shape=(4, 16, 16),
                               trace_teacher=kind.endswith("-traced"))
        data = SelfNPOBatch(cond, family.unconditional(batch), latents if start == "images" else None)

        def step(g):
            return recipe(data, g).losses.mean()

    def full_step(g):
        loss = step(g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind != "dpo":
            teacher.update(named)

    return family, full_step


def measure(batch: int, reps: int, warmup: int) -> dict:
    kinds = ["dpo", "selfnpo-images", "selfnpo-noise", "selfnpo-noise-traced"]
    setups = {k: setup(k, batch) for k in kinds}
    calls, times = {}, {k: [] for k in kinds}
    for k, (family, fn) in setups.items():
        for i in range(warmup):
            with count_unet_calls(family.unet) as c:
                fn(torch.Generator().manual_seed(i))
            calls[k] = c["calls"]
    for r in range(reps):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for k in order:
            t0 = time.perf_counter()
            setups[k][1](torch.Generator().manual_seed(100 + r))
            times[k].append(time.perf_counter() - t0)
    return {"times": times, "calls": calls}


def table(res: dict) -> str:
    times, calls = res["times"], res["calls"]
    base = statistics.mean(times["dpo"])
    lines = ["| step | UNet calls/step | s/step mean (sd) | time vs DPO |", "|---|---|---|---|"]
    for k in times:
        m, sd = statistics.mean(times[k]), statistics.stdev(times[k]) if len(times[k]) > 1 else 0.0
        lines.append(f"| {k} | {calls[k]} | {m:.3f} ({sd:.3f}) | {m / base:.2f}x |")
    return "\n".join(lines)


def target_rows(res: dict) -> list[tuple[str, float, float]]:
    """(claim, measured, limit): the data-free Self-NPO step against a DPO step, median of same-round ratios.

    Expected MISS: the walk from noise alone costs E[end+1] = 17.6 single-branch teacher rows per sample (official
    start range, N = 25, K = 5), more than the ~8 forward-equivalents of a DPO pair (RESULTS.md)."""
    t = res["times"]
    ratio = statistics.median(a / b for a, b in zip(t["selfnpo-noise"], t["dpo"]))
    traced = statistics.median(a / b for a, b in zip(t["selfnpo-noise-traced"], t["selfnpo-noise"]))
    return [("Self-NPO step from noise / Diffusion-DPO step (same batch)", ratio, 2.0),
            ("Self-NPO step from noise, trace_teacher / eager teacher", traced, 0.9)]


def add_args(ap: argparse.ArgumentParser, quick: bool = False) -> None:
    ap.add_argument("--batch", type=int, default=4 if quick else 8)
    ap.add_argument("--reps", type=int, default=3 if quick else 10)
    ap.add_argument("--warmup", type=int, default=1 if quick else 2)
    ap.add_argument("--threads", type=int, default=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch and fewer rounds (rough figures)")
    add_args(ap, "--quick" in __import__("sys").argv)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = measure(args.batch, args.reps, args.warmup)
    print(f"batch {args.batch}, {args.reps} interleaved rounds, {args.threads} thread(s), toy model, LoRA rank 8\n")
    print(table(res))
    for claim, value, limit in target_rows(res):
        print(f"{'PASS' if value <= limit else 'MISS'}  {claim}: {value:.2f}x (target <= {limit:.2f}x)")


if __name__ == "__main__":
    main()
