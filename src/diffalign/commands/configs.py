"""`diffalign configs`: the recipes shipped with the package, by the name `train` and `pairs` accept."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("configs", help="list the shipped recipes (diffalign train NAME / diffalign pairs pairs/NAME)",
                       description="Lists the YAML recipes inside the package: `diffalign train toy_mapo` uses "
                                   "one as it is, `--key=value` overrides it; `--show NAME` prints one to copy.")
    p.add_argument("--show", default=None, metavar="NAME", help="print one recipe's YAML")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..shipped_configs import describe, resolve_config, shipped_configs

    if args.show:
        print(open(resolve_config(args.show), encoding="utf-8").read(), end="")
        return 0
    configs = shipped_configs()
    width = max(len(name) for name in configs)
    for name, path in configs.items():
        print(f"{name.ljust(width)}  {describe(path)}")
    return 0
