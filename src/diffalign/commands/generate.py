"""`diffalign generate`: sample a pipeline into a folder of PNGs and a manifest.jsonl."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample a pipeline into a folder of PNGs and a manifest.jsonl",
                       description="Under `accelerate launch` / torchrun the prompts are shared out between the "
                                   "processes and one manifest.jsonl is written. Re-running into the same --out "
                                   "makes only the images still missing.")
    p.add_argument("--model", required=True, help="pipeline folder or hub id; 'toy' for the shipped toy model")
    p.add_argument("--vae", default=None, help="optional separate VAE folder or hub id")
    p.add_argument("--lora", default=None, help="a LoRA folder or .safetensors file for pipe.load_lora_weights "
                   "(a run folder or any of its checkpoint-N folders)")
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
    p.add_argument("--true-cfg-scale", type=float, default=None,
                   help="FLUX: classifier-free guidance with a negative branch at this scale (FLUX's --guidance-scale "
                        "is its distilled guidance); needed for --negative-model / --negative-prompt to act on FLUX")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weights and sampling dtype (float16 / bfloat16 halve memory on a GPU; SDXL in float32 needs "
                        "about 10 GB)")
    p.add_argument("--variant", default=None, help="load the weight files of this variant, e.g. fp16 (the hub's "
                   "*.fp16.safetensors)")
    p.add_argument("--scheduler", default=None, help="sampler: ddim, ddpm, pndm, lms, euler, euler_a, dpm++, dpm++_sde, "
                   "unipc, heun, or a diffusers scheduler class name (default: the model's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: the process's device; "
                   "under accelerate launch each process uses its own)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images of other settings already in --out (without it: an error; images of the "
                        "same settings are always kept and only missing ones are made)")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..fsutil import ensure_writable_dir
    from ..generation import GenerationSettings, generate_to_folder
    from ..generation.sample import accelerate_processes
    from ..models import load_lora_into_pipeline, load_pipeline
    from ..models.lora import step_record
    from ..safety.args import check_image_size, check_seed

    if (args.height is None) != (args.width is None):
        raise UserError("give both --height and --width, or neither (the model's native size)")
    for name in ("steps", "batch_size", "num_images_per_prompt"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    check_image_size(args.height, args.width)
    check_seed(args.seed)
    prompts = prompts_of(args)
    ensure_writable_dir(args.out)
    processes = accelerate_processes()  # one, or the processes of `accelerate launch` / torchrun
    if args.device is not None and processes.count > 1:
        raise UserError("--device picks one device, and under accelerate launch / torchrun each process uses its own: "
                        "drop --device")
    from ..models.loading import DTYPES

    pipe = load_pipeline(args.model, vae_path=args.vae, device=args.device or processes.device,
                         dtype=DTYPES[args.dtype], variant=args.variant, scheduler=args.scheduler)
    is_flux = type(pipe).__name__.startswith("Flux")
    if args.true_cfg_scale is not None and not is_flux:
        raise UserError(f"--true-cfg-scale applies to FLUX pipelines; {type(pipe).__name__} runs classifier-free "
                        "guidance at --guidance-scale already")
    if is_flux and (args.negative_model or args.negative_prompt) and not (args.true_cfg_scale or 0) > 1:
        raise UserError("FLUX uses a negative branch only under true CFG: pass --true-cfg-scale above 1 (e.g. 4) with "
                        "--negative-model / --negative-prompt")
    npo_record = {}
    if args.negative_model:
        from ..guidance import attach_negative_guidance

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
        true_cfg_scale=args.true_cfg_scale,
        extra={"model": args.model, "lora": args.lora, "vae": args.vae, "dtype": args.dtype, "variant": args.variant,
               **npo_record, **step_record(lora=args.lora, negative_model=args.negative_model)},
    )
    rows = generate_to_folder(pipe, prompts, args.out, settings, overwrite=args.overwrite, processes=processes)
    if processes.is_main:
        print(f"wrote {len(rows)} images and manifest.jsonl to {args.out}"
              + (f" ({processes.count} processes)" if processes.count > 1 else ""))
    return 0


def prompts_of(args) -> list[str]:
    """`--prompt`, or the prompt set `--prompts` names (read as train and pairs read it)."""
    from ..data.prompts import read_prompts

    return [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
