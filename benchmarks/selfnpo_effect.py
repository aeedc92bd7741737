"""Does a Self-NPO negative model lift prompt fidelity over plain CFG on the toy world? (Self-NPO issue)

Protocol fixed before results: the 8 held-out "a {colour} {shape}" prompts (never in the Self-NPO training
prompts), `--repeats` samples each, image i seeded with i, 20 DDIM steps, guidance 3 and 7.5; plain CFG of
the base model against the same pipeline with the negative model `theta_base + beta*delta` in the
unconditional branch (alpha = 0: no positive offset), beta = 1 (the papers' default). Samples are paired by
seed, so the difference is reported with its paired standard error.

    HF_HUB_OFFLINE=1 .venv/bin/diffalign train configs/toy_selfnpo.yaml          # -> runs/toy_selfnpo
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/selfnpo_effect.py --negative runs/toy_selfnpo
"""

from __future__ import annotations

import argparse
import json

import torch

from diffalign.data.prompts import toy_prompts
from diffalign.evaluation import get_reward
from diffalign.guidance.unet import attach_negative_guidance
from diffalign.models import load_pipeline
from diffalign.toy.fidelity import sample_images
from diffalign.toy.paths import toy_model_path


def correct(judge, images, prompts) -> torch.Tensor:
    d = judge.details(images, prompts)
    return (d["shape_correct"] * d["colour_correct"]).float()


def clarity(judge, images) -> torch.Tensor:
    """Secondary measure (added after the fidelity result): how clearly an image shows *some* valid scene,
    whatever the prompt asked: the judge's top probability averaged over shape, colour, size and style (the
    toy reward's score for the empty prompt). A stand-in for the papers' quality rewards."""
    return judge.score(images, [""] * len(images))


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = b - a
    return {"plain": a.mean().item(), "selfnpo": b.mean().item(), "diff": diff.mean().item(),
            "diff_se": (diff.std() / len(diff) ** 0.5).item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--negative", required=True, help="the Self-NPO output (LoRA folder or UNet folder)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--guidance", default="3,7.5")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="image i is seeded with seed + i (0 in the first runs)")
    ap.add_argument("--negative-prompt", choices=["empty", "prompt"], default="empty",
                    help="what the negative model is given in the guided run: the empty prompt (the papers' use, the "
                         "default) or the prompt itself (exploratory: a bad version of the model guiding the good one). "
                         "Plain CFG always uses the empty prompt")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    judge = get_reward("toy")
    prompts = [p for _ in range(args.repeats) for p in toy_prompts("heldout")]
    rows = []
    for g in (float(x) for x in args.guidance.split(",")):
        base = load_pipeline(str(toy_model_path()))
        plain_images = sample_images(base, prompts, g, seed=args.seed)
        attach_negative_guidance(base, negative=args.negative, alpha=0.0, beta=args.beta)
        guided_images = sample_images(base, prompts, g, seed=args.seed,
                                      negative_prompts=prompts if args.negative_prompt == "prompt" else None)
        row = {"guidance": g, "n": len(prompts), **paired(correct(judge, plain_images, prompts),
                                                          correct(judge, guided_images, prompts))}
        row["clarity"] = paired(clarity(judge, plain_images), clarity(judge, guided_images))
        rows.append(row)
    print("| guidance | n | plain CFG | + Self-NPO negative | difference (paired s.e.) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['n']} | {100 * r['plain']:.1f}% | {100 * r['selfnpo']:.1f}% | "
              f"{100 * r['diff']:+.1f} ± {100 * r['diff_se']:.1f} |")
    print("\nclarity (judge's top probability, mean over attributes; secondary):")
    print("| guidance | plain CFG | + Self-NPO negative | difference (paired s.e.) |")
    print("|---|---|---|---|")
    for r in rows:
        c = r["clarity"]
        print(f"| {r['guidance']:g} | {c['plain']:.3f} | {c['selfnpo']:.3f} | {c['diff']:+.3f} ± {c['diff_se']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
