"""`diffalign demo`: the whole loop on the toy model (pairs, MaPO/DPO, Self-NPO, guidance, report)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole loop on the toy model: pairs, MaPO/DPO, Self-NPO, guidance, report")
    p.add_argument("--out", default="demo_out", help="output folder; finished stages in it are reused")
    p.add_argument("--pairs", default=None, help="a pairs folder written by `diffalign pairs` to train MaPO and DPO "
                   "on, instead of the shipped judge-ranked toy pairs")
    p.add_argument("--jobs", type=int, default=None, help="stages run at once, each in a process of its own as soon "
                   "as the stages it needs are done (MaPO, DPO and Self-NPO train side by side, then one sampling stage "
                   "per model); default: one per available core, at most 3; 1: one after another in this process")
    p.add_argument("--only-stage", default=None, help=argparse.SUPPRESS)  # what a --jobs process runs
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, pairs=args.pairs, jobs=args.jobs, only=args.only_stage)
    return 0
