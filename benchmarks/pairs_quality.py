"""Do the toy Pick-Style and Pick-Safety datasets show what they claim, by the toy judge?

Builds (or reads: a finished output folder is reused, an interrupted one resumed) the datasets of
configs/pairs/toy_pick_style.yaml and configs/pairs/toy_pick_safety.yaml, then scores every chosen and
rejected image with the toy judge's style probability (`get_reward("toy").details(...)["style_<attr>"]`):

- Pick-Style (attribute "striped", asked for in the chosen prompt): the chosen images should be striped more
  often; reported: the mean P(striped) of chosen vs rejected and the share of pairs where chosen > rejected;
- Pick-Safety (attribute "outlined", asked for in the rejected prompt): the chosen images should show it
  less; reported: the mean P(outlined) and the share of pairs where chosen < rejected.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/pairs_quality.py [--out runs/pairs_quality]
        [--num_pairs=32 ...]    # any PairsConfig override, applied to both configs
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = (  # config, attribute, the chosen image should show it ...
    ("toy_pick_style", "striped", "more"),
    ("toy_pick_safety", "outlined", "less"),
)


def measure(table, judge, attribute: str) -> dict:
    """Mean P(attribute) of the chosen and the rejected images, and per-pair comparisons."""
    from PIL import Image

    rows = table.to_pylist()
    chosen, rejected = [], []
    for row in rows:
        first = row["label_0"] == 1.0
        chosen.append(row["jpg_0"] if first else row["jpg_1"])
        rejected.append(row["jpg_1"] if first else row["jpg_0"])
    captions = [row["caption"] for row in rows]

    def prob(images):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        return judge.details(pil, captions)[f"style_{attribute}"].double().numpy()

    p_c, p_r = prob(chosen), prob(rejected)
    return {"pairs": len(rows), "chosen": float(p_c.mean()), "rejected": float(p_r.mean()),
            "more": float(np.mean(p_c > p_r)), "less": float(np.mean(p_c < p_r))}


def main(argv=None) -> None:
    from diffalign.config_loader import load_config
    from diffalign.evaluation import get_reward
    from diffalign.generation import PairsConfig, read_pairs, run_pairs
    from diffalign.generation.pairs import load_sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pairs_quality", help="parent folder of the two datasets")
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(1)  # the machine is shared: one thread contends least

    judge = get_reward("toy")
    pipe, results = None, []
    for name, attribute, direction in SCENARIOS:
        cfg = load_config(PairsConfig, REPO / "configs/pairs" / f"{name}.yaml",
                          [f"--output_dir={Path(args.out) / name}", *overrides]).validate()
        pipe = pipe if pipe is not None else load_sampler(cfg)  # both configs sample the same toy model
        run_pairs(cfg, pipe=pipe)
        results.append((name, attribute, direction, cfg, measure(read_pairs(cfg.output_dir), judge, attribute)))

    print()
    print(f"{'dataset':<17} {'pairs':>5}  {'attribute':<9} {'P(attr) chosen':>14} {'P(attr) rejected':>16}  share of pairs")
    for name, attribute, direction, cfg, m in results:
        relation = ">" if direction == "more" else "<"
        print(f"{name:<17} {m['pairs']:>5}  {attribute:<9} {m['chosen']:>14.3f} {m['rejected']:>16.3f}  "
              f"{m[direction]:.1%} with chosen {relation} rejected")
    cfg = results[0][3]
    print(f"\ntoy model, {cfg.num_inference_steps} DDIM steps, guidance {cfg.guidance_scale}, seed {cfg.seed}; "
          "P(attr) = the toy judge's style probability (reward toy, details style_<attr>).")


if __name__ == "__main__":
    main()
