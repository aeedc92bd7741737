"""Sub-commands that live in their own module: each exposes `add_parser(subparsers)`, whose parser sets
`func` to a function `(args) -> int`. `cli.build_parser` adds every module named in `COMMANDS`."""

COMMANDS = ("pairs", "evaluate")
