"""`diffalign <command>`: thin argument parsing; each command calls one module.

User-fixable problems (`UserError`) print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample a pipeline into a folder of PNGs and a manifest.jsonl",
                       description="Under `accelerate launch` / torchrun the prompts are shared out between the "
                                   "processes and one manifest.jsonl is written. Re-running into the same --out "
                                   "makes only the images still missing.")
    p.add_argument("--model", required=True, help="pipeline folder or hub id; 'toy' for the shipped toy model")
    p.add_argument("--vae", default=None, help="optional separate VAE folder or hub id")
    p.add_argument("--lora", default=None, help="a LoRA folder or .safetensors file for pipe.load_lora_weights")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help="file: one prompt a line, or JSONL with a 'prompt' field; or a dataset "
                       "column, hf:SOURCE:SPLIT:COLUMN (e.g. hf:yuvalkirstain/pickapic_v2:test_unique:caption)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--steps", type=int, default=20, help="number of inference steps")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed + i")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--negative-prompt", default=None, help="goes to the negative model when --negative-model is given")
    p.add_argument("--negative-model", default=None,
                   help="NPO / Self-NPO offset delta for negative-branch CFG: a LoRA file/folder (one batched UNet "
                        "call per step) or a UNet folder (a second UNet, two calls per step)")
    p.add_argument("--npo-alpha", type=float, default=1.0,
                   help="weight of the positive offset (--lora) in the negative model base + alpha*eta + beta*delta")
    p.add_argument("--npo-beta", type=float, default=1.0, help="weight of the negative offset delta (--negative-model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images of other settings already in --out (without it: an error; images of the "
                        "same settings are always kept and only missing ones are made)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .generation import GenerationSettings, generate_to_folder, read_prompts
    from .generation.sample import accelerate_processes
    from .fsutil import ensure_writable_dir
    from .models import load_lora_into_pipeline, load_pipeline
    from .toy.paths import resolve_model

    if (args.height is None) != (args.width is None):
        raise UserError("give both --height and --width, or neither (the model's native size)")
    for name in ("steps", "batch_size", "num_images_per_prompt"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    from .safety.args import check_image_size, check_seed

    check_image_size(args.height, args.width)
    check_seed(args.seed)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    ensure_writable_dir(args.out)
    processes = accelerate_processes()  # one, or the processes of `accelerate launch` / torchrun
    pipe = load_pipeline(resolve_model(args.model), vae_path=args.vae, device=processes.device)
    npo_record = {}
    if args.negative_model:
        from .guidance import attach_negative_guidance

        info = attach_negative_guidance(
            pipe, negative=args.negative_model, positive=args.lora, alpha=args.npo_alpha, beta=args.npo_beta
        )
        npo_record = info.record()
        npo_record["negative_model"] = args.negative_model
    elif args.lora:
        load_lora_into_pipeline(pipe, args.lora)
    settings = GenerationSettings(
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        num_images_per_prompt=args.num_images_per_prompt,
        negative_prompt=args.negative_prompt,
        extra={"model": args.model, "lora": args.lora, "vae": args.vae, **npo_record},
    )
    rows = generate_to_folder(pipe, prompts, args.out, settings, overwrite=args.overwrite, processes=processes)
    if processes.is_main:
        print(f"wrote {len(rows)} images and manifest.jsonl to {args.out}"
              + (f" ({processes.count} processes)" if processes.count > 1 else ""))
    return 0


def _add_toy(sub) -> None:
    toy = sub.add_parser("toy", help="the embedded toy world: pretrain the model, train the judge, measure")
    tsub = toy.add_subparsers(dest="toy_command", required=True)

    p = tsub.add_parser("path", help="print where the shipped toy pipeline is")
    p.add_argument("--judge", action="store_true", help="print the judge's folder instead")
    p.set_defaults(func=cmd_toy_path)

    from .toy.pretrain_config import PretrainConfig

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
    p.add_argument("--vae-path", default=None, help="pipeline folder whose VAE round-trips part of each batch; 'toy' for the shipped one")
    p.set_defaults(func=cmd_toy_train_judge)

    p = tsub.add_parser("render-pairs", help="write Pick-a-Pic-schema pairs rendered from ground truth (parquet)")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--kind", choices=["style", "fidelity"], default="style",
                   help="style: chosen = the same scene in --style, rejected plain; fidelity: rejected has another colour and shape")
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
    from .toy.paths import TOY_JUDGE, toy_model_path

    print(TOY_JUDGE if args.judge else toy_model_path())
    return 0


def cmd_toy_pretrain(args) -> int:
    from .fsutil import ensure_writable_dir
    from .toy.pretrain import PretrainConfig, pretrain

    ensure_writable_dir(args.out)
    cfg = PretrainConfig(out=args.out, seed=args.seed, vae_steps=args.vae_steps, pool_size=args.pool_size,
                         unet_steps=args.unet_steps, unet_batch_size=args.unet_batch_size, threads=args.threads)
    out = pretrain(cfg)
    print(json.loads((out / "pretrain_summary.json").read_text()))
    print(f"toy pipeline written to {out}")
    return 0


def cmd_toy_train_judge(args) -> int:
    from .fsutil import ensure_writable_dir
    from .toy.paths import resolve_model
    from .toy.judge import train_judge

    ensure_writable_dir(args.out)
    kwargs = {"seed": args.seed, "vae_path": resolve_model(args.vae_path) if args.vae_path else None}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    out = train_judge(args.out, **kwargs)
    print(f"judge written to {out}")
    return 0


def cmd_toy_render_pairs(args) -> int:
    from .fsutil import ensure_writable_dir
    from .safety.args import check_count, check_output_file
    from .toy.render_pairs import write_pairs_parquet

    check_count(args.num_pairs, "-n/--num-pairs")
    check_output_file(args.out)
    ensure_writable_dir(Path(args.out).parent)
    path = write_pairs_parquet(args.out, args.num_pairs, kind=args.kind, style=args.style, seed=args.seed,
                               exclude_heldout=args.exclude_heldout)
    print(f"wrote {args.num_pairs} {args.kind} pairs to {path}")
    return 0


def cmd_toy_render_captions(args) -> int:
    from .fsutil import ensure_writable_dir
    from .safety.args import check_count, check_output_file
    from .toy.render_captions import write_captions_parquet

    check_count(args.num_rows, "-n/--num-rows")
    check_output_file(args.out)
    ensure_writable_dir(Path(args.out).parent)
    path = write_captions_parquet(args.out, args.num_rows, seed=args.seed, exclude_heldout=not args.include_heldout)
    print(f"wrote {args.num_rows} image-caption rows to {path}")
    return 0


def cmd_toy_fidelity(args) -> int:
    from .evaluation import get_reward
    from .models import load_lora_into_pipeline, load_pipeline
    from .toy.paths import resolve_model
    from .toy.fidelity import format_table, measure_fidelity

    try:
        scales = tuple(float(g) for g in args.guidance_scales.split(","))
    except ValueError:
        raise UserError(f"--guidance-scales must be comma-separated numbers, got '{args.guidance_scales}'") from None
    pipe = load_pipeline(resolve_model(args.model))
    if args.lora:
        load_lora_into_pipeline(pipe, args.lora)
    results = measure_fidelity(pipe, get_reward("toy"), scales, repeats=args.repeats, steps=args.steps, seed=args.seed)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole loop on the toy model: pairs, MaPO/DPO, Self-NPO, guidance, report")
    p.add_argument("--out", default="demo_out", help="output folder; finished stages in it are reused")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out)
    return 0


def _add_train(sub) -> None:
    from .training.methods import method_names  # the method table (no torch import)

    p = sub.add_parser("train", help=f"training: {', '.join(method_names())} (works under `accelerate launch`)", allow_abbrev=False,
                       description="diffalign train CONFIG.yaml [--key=value ...]; `--help-config` lists every key.")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (see configs/); keys can be overridden")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")
    p.set_defaults(func=cmd_train, accepts_overrides=True)

    p = sub.add_parser("cache", help="precompute VAE latents and prompt embeddings for a training config", allow_abbrev=False)
    p.add_argument("config")
    p.set_defaults(func=cmd_cache, accepts_overrides=True)

    p = sub.add_parser("export", help="export a LoRA for other tools (kohya / ComfyUI / A1111 keys)")
    p.add_argument("--lora", required=True, help="a LoRA folder or .safetensors written by diffalign train")
    p.add_argument("--format", choices=["kohya"], default="kohya")
    p.add_argument("--out", default=None, help="output .safetensors (default: beside the input, *_kohya.safetensors)")
    p.set_defaults(func=cmd_export)


def _train_config(args):
    from .config_loader import load_config
    from .training.config import TrainConfig

    return load_config(TrainConfig, args.config, args.overrides)


def cmd_train(args) -> int:
    if args.help_config:
        from .config_loader import config_help
        from .training.config import TrainConfig

        print(config_help(TrainConfig))
        return 0
    if args.config is None and not args.overrides:
        raise UserError("give a config file (see configs/) and/or --key=value overrides; --help-config lists the keys")
    from .training.loop import train

    train(_train_config(args))
    return 0


def cmd_cache(args) -> int:
    from .data import build_cache, fingerprint
    from .models import load_family
    from .toy.paths import resolve_model
    from .training.loop import load_config_pairs

    cfg = _train_config(args)
    cfg.validate()
    family = load_family(resolve_model(cfg.pretrained_model_name_or_path),
                         pretrained_vae_model_name_or_path=cfg.pretrained_vae_model_name_or_path)
    pairs = load_config_pairs(cfg)
    resolution = cfg.resolution or family.default_resolution
    cache_dir = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")
    build_cache(pairs, family, resolution=resolution, cache_dir=cache_dir)
    print(f"cache of {len(pairs)} pairs written to {cache_dir} (key {fingerprint(pairs, family, resolution=resolution)[:12]})")
    return 0


def cmd_export(args) -> int:
    from .training.export import export_kohya

    print(f"wrote {export_kohya(args.lora, args.out)}")
    return 0


def _add_extract_lora(sub) -> None:
    p = sub.add_parser("extract-lora", help="LoRA of chosen rank from a full fine-tune (SVD of tuned - base)")
    p.add_argument("--base", required=True, help="base pipeline folder or hub id; 'toy' for the toy model")
    p.add_argument("--tuned", required=True, help="fine-tuned UNet folder (or pipeline folder with unet/)")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank (exact when >= the difference's rank)")
    p.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    p.set_defaults(func=cmd_extract_lora)


def cmd_extract_lora(args) -> int:
    from .guidance import extract_lora

    print(f"wrote {extract_lora(args.base, args.tuned, args.rank, args.out)}")
    return 0


def _add_export_negative(sub) -> None:
    p = sub.add_parser("export-negative", help="write the composed negative UNet base + alpha*eta + beta*delta")
    p.add_argument("--model", required=True, help="base pipeline folder or hub id; 'toy' for the toy model")
    p.add_argument("--lora", default=None, help="positive offset eta: LoRA file/folder or UNet folder")
    p.add_argument("--negative-model", required=True, help="negative offset delta: LoRA file/folder or UNet folder")
    p.add_argument("--npo-alpha", type=float, default=1.0)
    p.add_argument("--npo-beta", type=float, default=1.0)
    p.add_argument("--out", required=True, help="output UNet folder (config.json + safetensors)")
    p.set_defaults(func=cmd_export_negative)


def cmd_export_negative(args) -> int:
    from .guidance import export_negative_unet
    from .models import load_pipeline
    from .toy.paths import resolve_model

    pipe = load_pipeline(resolve_model(args.model))
    export_negative_unet(pipe, args.out, negative=args.negative_model, positive=args.lora,
                         alpha=args.npo_alpha, beta=args.npo_beta)
    print(f"wrote the negative UNet to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffalign {__import__('diffalign').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_toy(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_extract_lora(sub)
    _add_export_negative(sub)
    import importlib

    from .commands import COMMANDS

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
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"diffalign {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a disk that filled up mid-run: one line and its own exit code (safety/disk.py)
        from .safety.disk import disk_full_message

        message = disk_full_message(exc)
        if message is None:
            raise
        print(f"diffalign {args.command}: error: {message}", file=sys.stderr)
        from .safety.disk import DISK_FULL_EXIT

        return DISK_FULL_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
