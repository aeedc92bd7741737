"""`diffalign toy ...`: the embedded toy world (pretrain the model, train the judge, render data, measure
fidelity). The command of the toy package, and so one of the few modules outside `toy/` that import it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..toy.pretrain_config import PretrainConfig


def add_parser(sub) -> None:
    toy = sub.add_parser("toy", help="the embedded toy world: pretrain the model, train the judge, measure")
    tsub = toy.add_subparsers(dest="toy_command", required=True)

    p = tsub.add_parser("path", help="print where the shipped toy pipeline is")
    p.add_argument("--judge", action="store_true", help="print the judge's folder instead")
    p.set_defaults(func=cmd_toy_path)

    p = tsub.add_parser("pretrain", help="train the toy StableDiffusionPipeline on CPU (~15 minutes)")
    defaults = PretrainConfig()
    p.add_argument("--out", required=True)
    for key in ("seed", "vae_steps", "pool_size", "unet_steps", "unet_batch_size", "threads"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(defaults, key))
    p.set_defaults(func=cmd_toy_pretrain)

    p = tsub.add_parser("train-judge", help="train the toy judge (the reward 'toy') on ground-truth renders")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="default: the judge module's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-path", default=None,
                   help="pipeline folder whose VAE round-trips part of each batch; 'toy' for the shipped one")
    p.set_defaults(func=cmd_toy_train_judge)

    p = tsub.add_parser("render-pairs", help="write Pick-a-Pic-schema pairs rendered from ground truth (parquet)")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--kind", choices=["style", "fidelity"], default="style",
                   help="style: chosen = the same scene in --style, rejected plain; fidelity: rejected has another "
                        "colour and shape")
    p.add_argument("--style", default="striped", choices=["outlined", "striped"])
    p.add_argument("-n", "--num-pairs", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-heldout", action="store_true",
                   help="no pair shows a held-out (colour, shape) combination, so the held-out prompts stay unseen")
    p.set_defaults(func=cmd_toy_render_pairs)

    p = tsub.add_parser("render-captions", help="write image-caption rows rendered from ground truth (parquet; "
                        "columns caption, image), e.g. for Self-NPO's image start")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("-n", "--num-rows", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include-heldout", action="store_true",
                   help="also show the held-out (colour, shape) combinations (default: excluded, so the held-out "
                        "evaluation prompts stay unseen)")
    p.set_defaults(func=cmd_toy_render_captions)

    p = tsub.add_parser("fidelity", help="judge fidelity of a toy pipeline's samples at several guidance scales")
    p.add_argument("--model", default="toy")
    p.add_argument("--lora", default=None)
    p.add_argument("--guidance-scales", default="1,3,7.5")
    p.add_argument("--repeats", type=int, default=10, help="each of the 24 'a {colour} {shape}' prompts this often")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_toy_fidelity)


def cmd_toy_path(args) -> int:
    from ..toy.paths import TOY_JUDGE, toy_model_path

    print(TOY_JUDGE if args.judge else toy_model_path())
    return 0


def cmd_toy_pretrain(args) -> int:
    from ..fsutil import ensure_writable_dir
    from ..toy.pretrain import PretrainConfig, pretrain

    ensure_writable_dir(args.out)
    cfg = PretrainConfig(out=args.out, seed=args.seed, vae_steps=args.vae_steps, pool_size=args.pool_size,
                         unet_steps=args.unet_steps, unet_batch_size=args.unet_batch_size, threads=args.threads)
    out = pretrain(cfg)
    print(json.loads((out / "pretrain_summary.json").read_text()))
    print(f"toy pipeline written to {out}")
    return 0


def cmd_toy_train_judge(args) -> int:
    from ..fsutil import ensure_writable_dir
    from ..models.source import resolve_model
    from ..toy.judge import train_judge

    ensure_writable_dir(args.out)
    kwargs = {"seed": args.seed, "vae_path": resolve_model(args.vae_path) if args.vae_path else None}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    out = train_judge(args.out, **kwargs)
    print(f"judge written to {out}")
    return 0


def _render(args, count: int, flag: str, write) -> Path:
    """The checks both render commands make, then `write()`: the path it wrote."""
    from ..fsutil import ensure_writable_dir
    from ..safety.args import check_count, check_output_file

    check_count(count, flag)
    check_output_file(args.out)
    ensure_writable_dir(Path(args.out).parent)
    return write()


def cmd_toy_render_pairs(args) -> int:
    from ..toy.render_pairs import write_pairs_parquet

    path = _render(args, args.num_pairs, "-n/--num-pairs", lambda: write_pairs_parquet(
        args.out, args.num_pairs, kind=args.kind, style=args.style, seed=args.seed, exclude_heldout=args.exclude_heldout))
    print(f"wrote {args.num_pairs} {args.kind} pairs to {path}")
    return 0


def cmd_toy_render_captions(args) -> int:
    from ..toy.render_captions import write_captions_parquet

    path = _render(args, args.num_rows, "-n/--num-rows", lambda: write_captions_parquet(
        args.out, args.num_rows, seed=args.seed, exclude_heldout=not args.include_heldout))
    print(f"wrote {args.num_rows} image-caption rows to {path}")
    return 0


def cmd_toy_fidelity(args) -> int:
    from ..models import load_lora_into_pipeline, load_pipeline
    from ..rewards import get_reward
    from ..toy.fidelity import format_table, measure_fidelity

    try:
        scales = tuple(float(g) for g in args.guidance_scales.split(","))
    except ValueError:
        raise UserError(f"--guidance-scales must be comma-separated numbers, got '{args.guidance_scales}'") from None
    pipe = load_pipeline(args.model)
    if args.lora:
        load_lora_into_pipeline(pipe, args.lora)
    results = measure_fidelity(pipe, get_reward("toy"), scales, repeats=args.repeats, steps=args.steps, seed=args.seed)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0
