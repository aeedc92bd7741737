"""`diffalign demo`: the whole loop on the toy model (pairs, MaPO/DPO, Self-NPO, guidance, report)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole loop on the toy model: pairs, MaPO/DPO, Self-NPO, guidance, report")
    p.add_argument("--out", default="demo_out", help="output folder; finished stages in it are reused")
    p.add_argument("--pairs", default=None, help="a pairs folder written by `diffalign pairs` to train MaPO and DPO "
                   "on, instead of the shipped judge-ranked toy pairs")
    p.add_argument("--jobs", type=int, default=None, help="stages run at once: that many worker processes, each "
                   "importing torch and diffusers once, run the stages one after another, each as soon as the stages it "
                   "needs are done (MaPO, DPO and Self-NPO train side by side, then one sampling stage per model), each "
                   "stage's output in OUT/STAGE.log; default: one per available core, at most 3; 1: one after another "
                   "in this process")
    p.add_argument("--only-stage", default=None, help=argparse.SUPPRESS)  # run one stage here (debugging)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of the --jobs worker processes
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, pairs=args.pairs, jobs=args.jobs, only=args.only_stage, worker=args.worker)
    return 0
