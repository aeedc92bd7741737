"""`diffalign train CONFIG.yaml [--key=value ...]`: train with one of the methods of the method table (works
under `accelerate launch`)."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    from ..training.methods import method_names  # the method table (no torch import)

    p = sub.add_parser("train", help=f"training: {', '.join(method_names())} (works under `accelerate launch`)",
                       allow_abbrev=False,
                       description="diffalign train CONFIG.yaml [--key=value ...]; `--help-config` lists every key.")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe: a file, or the name of a shipped one "
                   "(toy_mapo; `diffalign configs` lists them); keys can be overridden")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")
    p.set_defaults(func=cmd, accepts_overrides=True)


def train_config(args):
    """The TrainConfig of a config file plus `--key=value` overrides (not validated yet)."""
    from ..config_loader import load_config
    from ..shipped_configs import resolve_config
    from ..training.config import TrainConfig

    return load_config(TrainConfig, resolve_config(args.config), args.overrides)


def cmd(args) -> int:
    if args.help_config:
        from ..config_loader import config_help
        from ..training.config import TrainConfig

        print(config_help(TrainConfig))
        return 0
    if args.config is None and not args.overrides:
        raise UserError("give a config file (see configs/) and/or --key=value overrides; --help-config lists the keys")
    from ..training.loop import train

    train(train_config(args))
    return 0
