"""`diffalign evaluate`: score generated folders with rewards, compare them, write an HTML report."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score folders written by 'diffalign generate' with reward models; metrics and an HTML report",
        description="Score every image of the folders with every reward; report means with bootstrap CIs, win rates "
                    "against baselines on images matched by (prompt, seed), image grids and plots. Runs under "
                    "'accelerate launch' too (images sharded over processes).")
    p.add_argument("--images", nargs="+", action="extend", required=True, metavar="[LABEL=]DIR",
                   help="folder(s) with manifest.jsonl; the label defaults to the folder name")
    p.add_argument("--baseline", nargs="+", action="extend", default=[], metavar="[LABEL=]DIR",
                   help="baseline folder(s): every --images folder gets a win rate against each")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("LABEL", "AGAINST"),
                   help="also compare folder LABEL with folder AGAINST (win rates and distribution differences), "
                        "e.g. a tuned model with its negative against the tuned model alone; may be repeated")
    p.add_argument("--rewards", action="append", required=True, metavar="SPEC[,SPEC...]",
                   help="comma-separated reward specs NAME[=PATH][:KEY=VALUE], e.g. toy,pickscore=FOLDER,"
                        "aesthetic=CLIP:head=FILE (see docs/evaluation.md); may be repeated")
    p.add_argument("--distribution", default=None, metavar="SPEC",
                   help="also measure each folder as a set against ground-truth renders of its prompts: FD, precision "
                        "and recall with CIs, and paired differences against each baseline. SPEC: toy[=JUDGE_DIR]"
                        "[:k=3][:refs=1][:ref_seed=0][:vae=toy|none|PATH][:bootstrap=1000] (see docs/evaluation.md)")
    p.add_argument("--out", required=True, help="output folder: metrics.json, scores.csv, plots, report.html")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--batch-size", type=int, default=16, help="images per reward call")
    p.add_argument("--device", default=None, help="torch device for the rewards (default: this process's accelerate device)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes for the bootstraps of the --distribution measures (the same figures, sooner)")
    p.add_argument("--lenient", action="store_true",
                   help="skip missing or corrupt image files (counted in the report) instead of stopping")
    p.add_argument("--grid-rows", type=int, default=12, help="(prompt, seed) rows shown in the report's image grid")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..evaluation.evaluate import evaluate_folders, parse_folder_args
    from ..evaluation.report import format_table
    from ..safety.args import check_seed

    check_seed(args.seed)  # numpy's generators take 0 .. 2^32-1 here
    folders = parse_folder_args([*args.images, *args.baseline])
    baselines = list(parse_folder_args(args.baseline))
    specs = [s.strip() for group in args.rewards for s in group.split(",") if s.strip()]
    result = evaluate_folders(folders, specs, args.out, baselines, bootstrap=args.bootstrap, seed=args.seed,
                              level=args.level, batch_size=args.batch_size, device=args.device,
                              lenient=args.lenient, grid_rows=args.grid_rows, distribution=args.distribution,
                              compare=[tuple(pair) for pair in args.compare], processes=args.processes)
    if result.report_path is not None:  # only the main process writes and prints
        print(format_table(result))
        print(f"\nreport: {result.report_path}")
    return 0
