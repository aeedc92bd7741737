"""How much of a data-free Self-NPO step is the teacher's walk from noise, and how much batching could save.

The walk (training/selfnpo.py, `teacher_target`) starts every sample at pure noise and makes one single-branch
teacher call (guidance -1: the unconditional half only) per grid point until the sample's end position e; samples
that reached their end leave the batch, so the calls get smaller. Counts, official start range (i ~ U{0..N-1},
e = min(i+K, N)) on the N = 25 grid with K = 5: E[e+1] teacher rows per sample, max(e)+1 calls per step.

Measured in one process, round-robin (order rotated every round): the teacher forward (no_grad, LoRA on) at every
batch size 1..B, and a full LoRA Diffusion-DPO step at batch B pairs (selfnpo_cost.setup). From the per-call costs:
the expected walk cost with the shrinking batch (exact expectation over the start draws by simulation), the cost
of the same rows at full-batch efficiency (the most any re-batching of the walk could save), both against the DPO
step. The student's forward+backward of B rows comes on top of the walk.

Run: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/selfnpo_walk.py [--batch 8 --reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selfnpo_cost  # noqa: E402


def walk_sizes(B: int, N: int, K: int, draws: int, seed: int = 0) -> list[list[int]]:
    """Batch sizes of the walk's calls for `draws` simulated steps (official start range)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        i = torch.randint(0, N, (B,), generator=g)
        e = torch.clamp(i + K, max=N)
        out.append([int((e >= k).sum()) for k in range(int(e.max()) + 1)])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--grid", type=int, default=25)
    ap.add_argument("--teacher-steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, N, K = args.batch, args.grid, args.teacher_steps

    family, dpo_step = selfnpo_cost.setup("dpo", B)
    x = torch.randn(B, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    uncond = family.unconditional(B)
    from diffalign.models import Conditioning

    def forward(b: int):
        cond = Conditioning(uncond.prompt_embeds[:b], None, None)
        with torch.no_grad():
            family.predict(x[:b], torch.full((b,), 500), cond)

    names = [f"fwd{b}" for b in range(1, B + 1)] + ["dpo"]
    runs = {n: (lambda b=int(n[3:]): forward(b)) if n != "dpo" else (lambda: dpo_step(torch.Generator().manual_seed(0)))
            for n in names}
    for n in names:
        runs[n]()
    times = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    cost = {b: statistics.median(times[f"fwd{b}"]) for b in range(1, B + 1)}
    dpo = statistics.median(times["dpo"])

    sizes = walk_sizes(B, N, K, 20000)
    rows = statistics.mean(sum(s) for s in sizes) / B
    calls = statistics.mean(len(s) for s in sizes)
    shrinking = statistics.mean(sum(cost[n] for n in s) for s in sizes)
    ideal = rows * B * cost[B] / B
    print(f"batch {B}, N={N}, K={K}, {args.reps} rounds, 1 thread, toy UNet + LoRA rank 8")
    print("| batch b | teacher forward ms (median) | ms per row |")
    print("|---|---|---|")
    for b in range(1, B + 1):
        print(f"| {b} | {cost[b] * 1e3:.1f} | {cost[b] * 1e3 / b:.1f} |")
    print(f"\nteacher rows per sample E[e+1] = {rows:.2f}; calls per step E[max e + 1] = {calls:.2f}")
    print(f"DPO step (B={B} pairs, LoRA, fwd+bwd+reference+AdamW): {dpo * 1e3:.0f} ms")
    print(f"walk, shrinking batch (as implemented): {shrinking * 1e3:.0f} ms = {shrinking / dpo:.2f}x the DPO step")
    print(f"walk, same rows at full-batch efficiency: {ideal * 1e3:.0f} ms = {ideal / dpo:.2f}x the DPO step "
          f"(the most re-batching could save: {1 - ideal / shrinking:.0%} of the walk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
