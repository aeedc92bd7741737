"""Why does (or doesn't) a Self-NPO negative change prompt fidelity on the toy world? Three diagnostics.

0. ``--failures``: are the base model's wrong images unclear (a generic defect a negative could push away from)
   or clear images of the wrong shape or colour (a prompt-specific one)?
1. ``--curve``: the base model's fidelity against the guidance scale (held-out prompts, paired seeds). A
   negative model that acts like stronger guidance can only lift fidelity where this curve still rises.
2. The negative model used *as a model* (its own CFG, both branches = base + beta*delta): did training do what
   the method says? With teacher guidance w = -1 the student is taught to follow unconditional trajectories
   whatever the caption, so its own prompted samples should lose fidelity.
3. The offset in the unconditional branch along the base model's own sampling trajectories:
   ``d = eps_neg(x, t, "") - eps_base(x, t, "")`` against the guidance direction
   ``gdir = eps_base(x, t, c) - eps_base(x, t, "")``. Negative-branch guidance gives
   ``eps_u + g*gdir - (g-1)*d``; writing ``d = k*gdir + d_perp``, the parallel part changes the effective scale
   to ``g - (g-1)*k`` (k < 0: stronger guidance) and ``d_perp`` moves samples off the prompt axis. The same
   offset at the prompt itself, ``d_c = eps_neg(x, t, c) - eps_base(x, t, c)``, with
   ``k_c = <d_c, -gdir>/|gdir|^2``: teacher guidance w = -1 makes the prompted student follow the unconditional
   teacher, so k_c -> 1 means the negative learned to ignore the prompt (where its training signal went), while
   at the empty prompt the teacher's target is the model's own prediction (a fixed point).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/selfnpo_diagnose.py --negative runs/toy_selfnpo_600 --curve --failures
"""

from __future__ import annotations

import argparse
import json

import torch

from diffalign.data.prompts import toy_prompts
from diffalign.evaluation import get_reward
from diffalign.guidance.offsets import compose_dense_unet
from diffalign.models import load_pipeline
from diffalign.toy.fidelity import sample_images
from diffalign.toy.paths import toy_model_path


def fidelity(judge, images, prompts) -> tuple[float, float]:
    d = judge.details(images, prompts)
    ok = (d["shape_correct"] * d["colour_correct"]).float()
    return ok.mean().item(), (ok.std() / len(ok) ** 0.5).item()


@torch.no_grad()
def offset_along_trajectories(pipe, neg_unet, prompts, guidance: float, steps: int, seed: int) -> list[dict]:
    """Per DDIM step: mean over samples of |d|/|gdir|, cos(d, gdir) and k = <d, gdir>/|gdir|^2."""
    base = pipe.unet
    rows: dict[int, list] = {}

    class Probe(torch.nn.Module):  # sees every call the pipeline makes: [uncond; cond] batches
        def __init__(self):
            super().__init__()
            self.inner = base
            self.config, self.dtype, self.device = base.config, base.dtype, base.device

        def forward(self, sample, timestep, encoder_hidden_states, **kw):
            out = base(sample, timestep, encoder_hidden_states, **kw)
            eps = out[0] if isinstance(out, tuple) else out.sample
            n = sample.shape[0] // 2
            eu, ec = eps[:n].float(), eps[n:].float()
            en = neg_unet(sample, timestep, encoder_hidden_states, **kw)  # both prompts, one call
            en = (en[0] if isinstance(en, tuple) else en.sample).float()
            d, gdir = (en[:n] - eu).flatten(1), (ec - eu).flatten(1)
            d_c = (en[n:] - ec).flatten(1)  # the offset at the prompt itself
            gn = gdir.norm(dim=1)
            rows.setdefault(int(timestep), []).append(torch.stack([
                d.norm(dim=1) / gn, torch.nn.functional.cosine_similarity(d, gdir, dim=1),
                (d * gdir).sum(1) / gn**2, d_c.norm(dim=1) / gn, -(d_c * gdir).sum(1) / gn**2], 1))
            return out

    pipe.unet = Probe()
    try:
        sample_images(pipe, prompts, guidance, steps=steps, seed=seed)
    finally:
        pipe.unet = base
    out = []
    for t in sorted(rows, reverse=True):
        v = torch.cat(rows[t])
        out.append({"t": t, "ratio": v[:, 0].mean().item(), "cos": v[:, 1].mean().item(), "k": v[:, 2].mean().item(),
                    "ratio_c": v[:, 3].mean().item(), "k_c": v[:, 4].mean().item()})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--negative", default=None, help="a Self-NPO output (LoRA folder or UNet folder)")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--curve", action="store_true", help="also the base model's fidelity against guidance")
    ap.add_argument("--failures", action="store_true",
                    help="also: are the base's wrong images unclear, or clear images of the wrong thing?")
    ap.add_argument("--skip-as-model", action="store_true", help="only the offset along trajectories")
    ap.add_argument("--scales", default="1,3,5,7.5,10,15")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    judge = get_reward("toy")
    prompts = [p for _ in range(args.repeats) for p in toy_prompts("heldout")]
    report: dict = {"n": len(prompts), "seed": args.seed}
    pipe = load_pipeline(str(toy_model_path()))
    if args.curve:
        report["curve"] = []
        for g in (float(x) for x in args.scales.split(",")):
            m, se = fidelity(judge, sample_images(pipe, prompts, g, steps=args.steps, seed=args.seed), prompts)
            report["curve"].append({"guidance": g, "fidelity": m, "se": se})
        print("base model, held-out prompts: fidelity (shape and colour correct) against guidance")
        print("| guidance | fidelity |\n|---|---|")
        for r in report["curve"]:
            print(f"| {r['guidance']:g} | {100 * r['fidelity']:.1f}% ± {100 * r['se']:.1f} |")
    if args.failures:
        report["failures"] = []
        print("\nbase model, held-out prompts: clarity of the right and the wrong images")
        print("| guidance | right: n, clarity | wrong: n, clarity | wrong with clarity > 0.9 |\n|---|---|---|---|")
        for g in (3.0, 7.5):
            images = sample_images(pipe, prompts, g, steps=args.steps, seed=args.seed)
            d = judge.details(images, prompts)
            ok = (d["shape_correct"] * d["colour_correct"]).bool()
            clear = judge.score(images, [""] * len(images))
            row = {"guidance": g, "right": int(ok.sum()), "right_clarity": clear[ok].mean().item(),
                   "wrong": int((~ok).sum()), "wrong_clarity": clear[~ok].mean().item(),
                   "wrong_clear": int(((~ok) & (clear > 0.9)).sum())}
            report["failures"].append(row)
            print(f"| {g:g} | {row['right']}, {row['right_clarity']:.3f} | {row['wrong']}, {row['wrong_clarity']:.3f} | "
                  f"{row['wrong_clear']} |")
    if args.negative:
        neg_unet = compose_dense_unet(pipe.unet, type(pipe), negative=args.negative, beta=args.beta).eval()
        base_unet = pipe.unet
        report["as_model"] = []
        for g in (() if args.skip_as_model else (1.0, 7.5)):
            pipe.unet = neg_unet
            m, se = fidelity(judge, sample_images(pipe, prompts, g, steps=args.steps, seed=args.seed), prompts)
            pipe.unet = base_unet
            m0, se0 = fidelity(judge, sample_images(pipe, prompts, g, steps=args.steps, seed=args.seed), prompts)
            report["as_model"].append({"guidance": g, "base": m0, "negative": m, "se": se})
        print(f"\nthe negative model as a model (beta={args.beta:g}), its own CFG, held-out prompts")
        print("| guidance | base | negative model |\n|---|---|---|")
        for r in report["as_model"]:
            print(f"| {r['guidance']:g} | {100 * r['base']:.1f}% | {100 * r['negative']:.1f}% ± {100 * r['se']:.1f} |")
        traj = offset_along_trajectories(pipe, neg_unet, prompts, 7.5, args.steps, args.seed)
        report["offset"] = traj
        print("\noffset in the unconditional branch along base trajectories (g = 7.5): mean over samples")
        print("d: offset at the empty prompt (what negative-branch guidance uses); d_c: offset at the prompt;")
        print("k_c: how far the negative moved its prompted prediction towards the base's unconditional one (1 = all the way)")
        print("| t | abs(d) / abs(gdir) | cos(d, gdir) | k (g_eff = g - (g-1)k) | abs(d_c) / abs(gdir) | k_c |")
        print("|---|---|---|---|---|---|")
        for r in traj[:: max(1, len(traj) // 10)]:
            print(f"| {r['t']} | {r['ratio']:.2f} | {r['cos']:+.2f} | {r['k']:+.2f} | {r['ratio_c']:.2f} | {r['k_c']:+.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
