"""One picture of the Self-NPO second follow-up: each negative's paired difference to plain CFG (± 2 s.e.) in
prompt fidelity and clarity, with the empty negative prompt, and fidelity with the prompt as the negative prompt.

    .venv/bin/python benchmarks/plot_selfnpo_followup.py runs/followup --out benchmarks/selfnpo_followup.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {  # run folder -> what it is
    "sn_img": "Self-NPO, image start, w=-1 (LoRA)",
    "sn_img_w5": "Self-NPO, image start, w=-5 (LoRA)",
    "sn_full": "Self-NPO, official SD1.5 recipe (full UNet, lr 1e-6)",
    "npo_fid": "control: Diffusion-NPO on fidelity pairs",
    "sft_wrong": "control: SFT on the wrong images",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LABELS if (args.folder / f"effect_{n}.json").is_file()]
    if not names:
        raise SystemExit(f"no effect_*.json in {args.folder}: run benchmarks/selfnpo_followup.sh first")
    panels = [("fidelity, empty negative prompt (points)", "effect", lambda r: (100 * r["diff"], 100 * r["diff_se"])),
              ("clarity, empty negative prompt", "effect", lambda r: (r["clarity"]["diff"], r["clarity"]["diff_se"])),
              ("fidelity, the prompt as negative prompt (points)", "effect_prompt",
               lambda r: (100 * r["diff"], 100 * r["diff_se"]))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.55 * len(names) + 1.6), sharey=True)
    for ax, (title, prefix, value) in zip(axes, panels):
        for j, name in enumerate(names):
            path = args.folder / f"{prefix}_{name}.json"
            if not path.is_file():
                continue
            for row, colour, dy in zip(json.loads(path.read_text()), ("C0", "C1"), (-0.15, 0.15)):
                m, se = value(row)
                ax.errorbar(m, j + dy, xerr=2 * se, fmt="o", color=colour, capsize=3,
                            label=f"g = {row['guidance']:g}" if j == 0 else None)
        ax.axvline(0, color="grey", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("guided - plain CFG (paired, ± 2 s.e.)")
    axes[0].set_yticks(range(len(names)), [LABELS[n] for n in names], fontsize=9)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Negative models in the unconditional branch, toy world: 8 held-out prompts x 20 paired seeds", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
