"""The negative branch on the toy world: Self-NPO negatives beside a positive control (a bad version of the model).

Issue 16, section 2. Autoguidance (Karras et al. 2024) guides a model with a less-trained version of itself and
improves quality where a plain unconditional branch does not. This script samples the held-out toy prompts with
an explicit DDIM loop (20 steps, eta 0; image i seeded with seed + i exactly as the stock pipeline seeds it, so
`cfg` reproduces `StableDiffusionPipeline` bit for bit) and one of these combinations at guidance g, where
`b` is the base UNet, `n` the negative / guiding UNet, `c` the prompt and `u` the empty prompt:

| mode | noise prediction | what it is |
|---|---|---|
| `cfg` | `b(u) + g (b(c) - b(u))` | plain classifier-free guidance |
| `neg` | `n(u) + g (b(c) - n(u))` | the negative branch as users run it (NPO / Self-NPO) |
| `auto` | `n(c) + g (b(c) - n(c))` | autoguidance: the prompt in both branches |
| `cfg+auto` | `b(u) + g (b(c) - b(u)) + a (b(c) - n(c))` | CFG plus an autoguidance term of weight `a` |

`--interval LO,HI` applies the negative / guiding model only where the timestep is in [LO, HI] (plain CFG
elsewhere), as in the guidance-interval papers. A negative is a UNet folder or a pipeline folder (taken whole),
or a LoRA (composed as `theta_base + beta*delta`, beta 1).

Measured on every image set: shape+colour fidelity and clarity (toy judge), and, when the distribution metrics
are available, the set's Frechet distance / precision / recall on the judge's features against ground-truth
renders of the same prompts. Images are stored as `.npz` under `--out`, so a measure can be re-computed later.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/negative_control.py \
        --negative control=runs/control/pt300 --modes cfg,neg,auto --out runs/control/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffalign.data.prompts import toy_prompts
from diffalign.demo import split_prompts
from diffalign.evaluation import get_reward
from diffalign.guidance.offsets import compose_dense_unet, load_unet, resolve_offset
from diffalign.models import load_pipeline
from diffalign.toy.paths import toy_model_path

MODES = ("cfg", "neg", "auto", "cfg+auto")


def load_negative(pipe, path: str):
    """A full UNet for the guiding branch: a UNet/pipeline folder as it is, or base + LoRA."""
    offset = resolve_offset(path)
    if offset.is_lora:
        return compose_dense_unet(pipe.unet, type(pipe), negative=path, alpha=0.0, beta=1.0).eval()
    return load_unet(path, dtype=pipe.unet.dtype).eval()


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def sample(pipe, neg_unet, prompts: list[str], g: float, mode: str, seed: int = 0, steps: int = 20,
           weight: float = 1.0, interval: tuple[int, int] | None = None, batch_size: int = 80) -> np.ndarray:
    """uint8 [N, H, W, 3]; image i from prompts[i] with seed + i."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if mode != "cfg" and neg_unet is None:
        raise ValueError(f"mode {mode!r} needs a negative model")
    unet, sched = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"{mode} g={g:g}", leave=False):
        batch = prompts[start : start + batch_size]
        B = len(batch)
        c, u = encode(pipe, batch), encode(pipe, [""] * B)
        x = torch.cat([torch.randn((1, unet.config.in_channels, size, size),
                                   generator=torch.Generator().manual_seed(seed + start + i))
                       for i in range(B)]) * sched.init_noise_sigma
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            eb_u, eb_c = unet(torch.cat([xin, xin]), t, encoder_hidden_states=torch.cat([u, c])).sample.chunk(2)
            active = mode != "cfg" and (interval is None or interval[0] <= int(t) <= interval[1])
            if not active:
                eps = eb_u + g * (eb_c - eb_u)
            elif mode == "neg":
                en = neg_unet(xin, t, encoder_hidden_states=u).sample
                eps = en + g * (eb_c - en)
            elif mode == "auto":
                en = neg_unet(xin, t, encoder_hidden_states=c).sample
                eps = en + g * (eb_c - en)
            else:  # cfg+auto
                en = neg_unet(xin, t, encoder_hidden_states=c).sample
                eps = eb_u + g * (eb_c - eb_u) + weight * (eb_c - en)
            x = sched.step(eps, t, x).prev_sample
        img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        out.append(pipe.image_processor.postprocess(img, output_type="np"))
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def judge_measures(judge, images, prompts) -> dict[str, np.ndarray]:
    d = judge.details(images, prompts)
    return {"fidelity": (d["shape_correct"] * d["colour_correct"]).float().numpy(),
            "clarity": judge.score(images, [""] * len(images)).numpy()}


def paired(a: np.ndarray, b: np.ndarray) -> str:
    diff = b - a
    return f"{diff.mean():+.3f} ± {diff.std(ddof=1) / len(diff) ** 0.5:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--negative", action="append", default=[], help="NAME=PATH, repeatable")
    ap.add_argument("--modes", default="neg,auto")
    ap.add_argument("--guidance", default="3,7.5")
    ap.add_argument("--weight", type=float, default=1.0, help="a, the autoguidance term's weight in cfg+auto")
    ap.add_argument("--interval", default=None, help="LO,HI: use the negative only for timesteps in [LO, HI]")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default="heldout", choices=["heldout", "train"],
                    help="heldout: the 8 held-out colour/shape prompts; train: the 16 other colour/shape prompts")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(str(toy_model_path()))
    pipe.set_progress_bar_config(disable=True)
    judge = get_reward("toy")
    prompt_set = toy_prompts("heldout") if args.prompts == "heldout" else split_prompts()[0]
    prompts = [p for _ in range(args.repeats) for p in prompt_set]
    interval = tuple(int(v) for v in args.interval.split(",")) if args.interval else None
    tag = f"s{args.seed}" + (f"_i{interval[0]}-{interval[1]}" if interval else "") + \
        (f"_a{args.weight:g}" if "cfg+auto" in args.modes else "")
    negatives = dict(item.split("=", 1) for item in args.negative)
    results = {}
    for g in (float(v) for v in args.guidance.split(",")):
        base_file = out / f"cfg_g{g:g}_s{args.seed}_{args.prompts}.npz"
        if base_file.exists():
            base_images = np.load(base_file)["images"]
        else:
            base_images = sample(pipe, None, prompts, g, "cfg", seed=args.seed)
            np.savez_compressed(base_file, images=base_images, prompts=np.array(prompts))
        base = judge_measures(judge, base_images, prompts)
        for name, path in negatives.items():
            neg_unet = load_negative(pipe, path)
            for mode in args.modes.split(","):
                if mode == "cfg":
                    continue
                images = sample(pipe, neg_unet, prompts, g, mode, seed=args.seed, weight=args.weight, interval=interval)
                np.savez_compressed(out / f"{name}_{mode}_g{g:g}_{tag}_{args.prompts}.npz", images=images,
                                    prompts=np.array(prompts))
                m = judge_measures(judge, images, prompts)
                row = {k: {"base": float(base[k].mean()), "model": float(m[k].mean()), "diff": paired(base[k], m[k])}
                       for k in m}
                results[f"{name} {mode} g={g:g}"] = row
                print(f"{name:>12} {mode:>8} g={g:<4g} fidelity {row['fidelity']['base']:.3f} -> "
                      f"{row['fidelity']['model']:.3f} ({row['fidelity']['diff']})  clarity {row['clarity']['base']:.3f} -> "
                      f"{row['clarity']['model']:.3f} ({row['clarity']['diff']})", flush=True)
    (out / f"results_{tag}_{args.prompts}_{'-'.join(negatives)}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
