"""`diffalign <command>`: thin argument parsing; each command calls one module.

The commands are the modules of `commands/` (`COMMANDS`, in help order). User-fixable problems (`UserError`)
print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffalign {__import__('diffalign').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at the interpreter's exit
        return code
    except UserError as exc:
        print(f"diffalign {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `diffalign configs | head`: the reader has gone, which is not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as exc:  # a disk that filled up mid-run: one line and its own exit code (safety/disk.py)
        from .safety.disk import DISK_FULL_EXIT, disk_full_message

        message = disk_full_message(exc)
        if message is None:
            raise
        print(f"diffalign {args.command}: error: {message}", file=sys.stderr)
        return DISK_FULL_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
