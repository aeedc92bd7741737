"""`diffalign pairs CONFIG.yaml [--key=value ...]`: a preference dataset from a model's own samples.

    diffalign pairs configs/pairs/toy_pick_style.yaml
    diffalign pairs configs/pairs/toy_ranked.yaml --num_pairs=32 --output_dir=runs/ranked_small
    diffalign pairs --help-config

Recipes, keys and the output layout: `generation/pairs/`, docs/pairs.md.
Under `accelerate launch -m diffalign pairs ...` the sampling is shared out between the processes.
"""

from __future__ import annotations

import shlex
import sys

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pairs", help="a preference dataset (Pick-a-Pic parquet shards) from a model's own samples",
        description="diffalign pairs CONFIG.yaml [--key=value ...]. Recipes: prefix (MaPO Pick-Style / Pick-Safety: "
                    "chosen and rejected prompt templates, one seed), ranked (candidates ranked by a reward, best "
                    "against worst), target (real images of an image-caption set against the model's samples). "
                    "Re-running the same config resumes; `--help-config` lists every key.",
        allow_abbrev=False)
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (see configs/pairs/); keys can be overridden")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")
    p.set_defaults(func=cmd, accepts_overrides=True)


def cmd(args) -> int:
    from ..config_loader import config_help, load_config
    from ..generation.pairs import PairsConfig, run_pairs
    from ..shipped_configs import resolve_config

    if args.help_config:
        print(config_help(PairsConfig))
        return 0
    if args.config is None and not args.overrides:
        raise UserError("give a config file (see configs/pairs/) and/or --key=value overrides; --help-config lists the keys")
    cfg = load_config(PairsConfig, resolve_config(args.config), args.overrides).validate()
    from ..generation.sample import accelerate_processes

    processes = accelerate_processes()  # one, or the processes of `accelerate launch` / torchrun
    result = run_pairs(cfg, processes=processes)
    if not processes.is_main:
        return 0
    print(f"wrote {result.summary()}")
    print(f"data: {result.output_dir}/data/ (summary.json, pairs_config.yaml beside it)")
    print(f"train on it: diffalign train CONFIG.yaml --dataset_name={shlex.quote(result.dataset_name)}")
    if result.pairs == 0:
        print("warning: no pairs were kept; lower margin, loosen the filter, raise max_tries or sample more candidates, "
              "or check the reward", file=sys.stderr)
    return 0
