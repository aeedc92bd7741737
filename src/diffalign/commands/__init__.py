"""Sub-commands that live in their own module: each exposes `add_parser(subparsers)`, whose parser sets
`func` to a function `(args) -> int`. `cli.build_parser` adds every module named in `COMMANDS`."""

#: Module names, in the order `diffalign --help` lists the commands.
COMMANDS = ("generate", "toy", "train", "cache", "export", "demo", "extract_lora", "export_negative", "pairs", "evaluate",
            "configs", "plan")
