"""The toy distribution measures (FD, precision, recall against ground-truth renders) of stored image sets.

`negative_control.py` stores every image set it samples as `.npz` (images, prompts). This script measures
them against a baseline set made for the same prompts with the same seeds (row i of both sets): each set's
FD / precision / recall with its bootstrap interval, and the paired difference to the baseline (pairs resampled
jointly). The reference is 4 VAE round-tripped renders per image of each prompt (fixed before any result).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/npz_distribution.py \
        --baseline runs/control/eval/cfg_g3_s0_heldout.npz runs/control/eval/control_neg_g3_*.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffalign.evaluation.toy_distribution import ToyDistribution

REFS_PER_IMAGE = 4


def load(path: str) -> tuple[np.ndarray, list[str]]:
    data = np.load(path)
    return data["images"], [str(p) for p in data["prompts"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help=".npz of the baseline set")
    ap.add_argument("sets", nargs="+", help=".npz sets made for the same prompts and seeds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    measure = ToyDistribution(references_per_image=REFS_PER_IMAGE)
    base_images, prompts = load(args.baseline)
    base_features = measure.features(base_images)
    base = measure.metrics_of_features(base_features, prompts)
    rows = {"baseline": {"file": args.baseline, **base.as_dict()}}
    print(f"baseline {Path(args.baseline).name}: FD {base.fd.estimate:.3f} [{base.fd.low:.3f}, {base.fd.high:.3f}]  "
          f"precision {base.precision.estimate:.3f}  recall {base.recall.estimate:.3f}")
    for path in args.sets:
        images, p = load(path)
        if p != prompts:
            raise SystemExit(f"{path}: its prompts differ from the baseline's; sets must be matched row for row")
        feats = measure.features(images)
        own = measure.metrics_of_features(feats, prompts)
        diff = measure.compare_features(feats, base_features, prompts)
        rows[path] = {"metrics": own.as_dict(), "difference": diff.as_dict()}
        p, r = diff.precision, diff.recall
        print(f"{Path(path).name}: FD {own.fd.estimate:.3f} (diff {diff.fd.estimate:+.3f} [{diff.fd.low:+.3f}, "
              f"{diff.fd.high:+.3f}])  precision {own.precision.estimate:.3f} ({p.estimate:+.3f} [{p.low:+.3f}, "
              f"{p.high:+.3f}])  recall {own.recall.estimate:.3f} ({r.estimate:+.3f} [{r.low:+.3f}, {r.high:+.3f}])",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
