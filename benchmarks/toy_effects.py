"""Do the preference methods do what the papers claim, on the toy world? (issue: training, done-when)

Two scenarios, evaluation protocol fixed before any result was looked at:

1. Pick-Style (MaPO's reference-mismatch case): pairs of renders of one scene, chosen striped, rejected
   plain, caption naming only the content ("a red circle"). Six colour/shape prompts are held out of
   training. Measured on the held-out prompts: the judge's probability that a sample is striped, and
   shape-and-colour fidelity (the style should not cost the content).
2. Judge-labelled preference (Pick-a-Pic analogue): two base samples per prompt at guidance 3, the one the
   judge finds more faithful is chosen (pairs with equal scores are dropped). Measured: shape-and-colour
   fidelity on all 24 'a {colour} {shape}' prompts at guidance 7.5.

Every model is sampled on the same prompts and seeds (seed = index), 20 DDIM steps.

    HF_HUB_OFFLINE=1 python benchmarks/toy_effects.py --out runs/toy_effects
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
from PIL import Image

from diffalign.evaluation import get_reward
from diffalign.models import load_lora_into_pipeline, load_pipeline
from diffalign.toy.fidelity import fidelity_prompts, sample_images
from diffalign.toy.paths import toy_model_path
from diffalign.toy.render_pairs import render_pairs
from diffalign.toy.world import COLOUR_NAMES, SHAPES, caption
from diffalign.training.config import TrainConfig
from diffalign.training.loop import train

HELD_OUT = [caption(shape=SHAPES[i % 4], colour=c) for i, c in enumerate(COLOUR_NAMES)]


def _write(rows, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def judge_pairs(pipe, judge, n_prompts_repeat: int, guidance: float, seed: int = 10_000, decisive: bool = False) -> list[dict]:
    """Two samples per prompt; the judge's more faithful one is chosen. `decisive`: keep only pairs where
    exactly one image shows both the asked shape and colour."""
    prompts = fidelity_prompts(n_prompts_repeat)
    a = sample_images(pipe, prompts, guidance, seed=seed)
    b = sample_images(pipe, prompts, guidance, seed=seed + len(prompts))
    sa, sb = judge.score(a, prompts), judge.score(b, prompts)
    da, db = judge.details(a, prompts), judge.details(b, prompts)
    ok_a = (da["shape_correct"] * da["colour_correct"]).tolist()
    ok_b = (db["shape_correct"] * db["colour_correct"]).tolist()
    rows = []
    for p, x, y, u, v, oa, ob in zip(prompts, a, b, sa.tolist(), sb.tolist(), ok_a, ok_b):
        if decisive:
            if oa == ob:
                continue
            u, v = oa, ob
        elif abs(u - v) < 0.05:
            continue  # too close to call: a tie, dropped
        rows.append({"caption": p, "jpg_0": _png(x), "jpg_1": _png(y), "label_0": float(u > v), "label_1": float(u <= v)})
    return rows


def evaluate(model_path, lora, judge, prompts, guidance):
    pipe = load_pipeline(str(model_path))
    if lora:
        load_lora_into_pipeline(pipe, lora)
    images = sample_images(pipe, prompts, guidance, seed=0)
    d = judge.details(images, prompts)
    sc = (d["shape_correct"] * d["colour_correct"]).float()
    return {"striped": d["style_striped"].mean().item(),
            "striped_share": (d["style_striped"] > 0.5).float().mean().item(),
            "fidelity": sc.mean().item(), "fidelity_se": (sc.std() / len(sc) ** 0.5).item()}, images


def run(args):
    out = Path(args.out)
    judge = get_reward("toy")
    model = toy_model_path()
    common = dict(pretrained_model_name_or_path=str(model), resolution=32, train_batch_size=args.batch,
                  max_train_steps=args.steps, learning_rate=args.lr, lr_scheduler="constant", rank=8, seed=0,
                  report_to="none", checkpointing_steps=10_000, random_flip=False)
    results = {} if args.only_judge else _style(args, out, judge, model, common)
    results.update(_judge(args, out, judge, model, common))
    (out / "toy_effects.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results


def _style(args, out, judge, model, common):
    results = {}
    rows = [r for r in render_pairs(args.pairs, kind="style", seed=1) if r["caption"] not in HELD_OUT]
    style_data = _write(rows, out / "data" / "pick_style.parquet")
    held_out = [p for _ in range(args.repeats) for p in HELD_OUT]
    results["style"] = {"base": evaluate(model, None, judge, held_out, 7.5)[0], "train_pairs": len(rows)}
    for method, extra in (("mapo", {}), ("dpo", {"beta": args.dpo_beta}), ("sft", {})):
        t0 = time.time()
        run_dir = train(TrainConfig(method=method, dataset_name=str(style_data), output_dir=str(out / f"style_{method}"),
                                    **common, **extra))
        results["style"][method] = {**evaluate(model, str(run_dir), judge, held_out, 7.5)[0],
                                    "train_seconds": round(time.time() - t0, 1)}
        print(method, results["style"][method], flush=True)
    return results


def _judge(args, out, judge, model, common):
    results = {}
    pipe = load_pipeline(str(model))
    rows = judge_pairs(pipe, judge, args.judge_repeats, guidance=args.pair_guidance, decisive=args.decisive)
    pref_data = _write(rows, out / "data" / "judge_pairs.parquet")
    prompts = fidelity_prompts(args.repeats)
    results["judge"] = {"base": evaluate(model, None, judge, prompts, 7.5)[0], "train_pairs": len(rows)}
    for method, extra in (("dpo", {"beta": args.dpo_beta}), ("mapo", {})):
        t0 = time.time()
        run_dir = train(TrainConfig(method=method, dataset_name=str(pref_data), output_dir=str(out / f"judge_{method}"),
                                    **common, **extra))
        results["judge"][method] = {**evaluate(model, str(run_dir), judge, prompts, 7.5)[0],
                                    "train_seconds": round(time.time() - t0, 1)}
        print(method, results["judge"][method], flush=True)
    return results


def table(results) -> str:
    lines = ["| scenario | model | striped prob (held-out) | striped share | shape+colour fidelity |", "|---|---|---|---|---|"]
    for scen, block in results.items():
        for name, r in block.items():
            if isinstance(r, dict):
                lines.append(f"| {scen} | {name} | {r['striped']:.3f} | {100 * r['striped_share']:.1f}% | "
                             f"{100 * r['fidelity']:.1f}% ± {100 * r['fidelity_se']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/toy_effects")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--judge-repeats", type=int, default=16, help="judge pairs: 24 prompts x this")
    ap.add_argument("--repeats", type=int, default=10, help="evaluation samples per prompt")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--dpo-beta", type=float, default=5000.0)
    ap.add_argument("--pair-guidance", type=float, default=3.0, help="guidance of the judge-labelled pairs' samples")
    ap.add_argument("--decisive", action="store_true", help="judge pairs: keep only one-right-one-wrong pairs")
    ap.add_argument("--only-judge", action="store_true", help="skip the Pick-Style scenario")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = run(args)
    print(table(results))


if __name__ == "__main__":
    main()
