"""`diffalign plan CONFIG.yaml [--key=value ...] [--gpu-memory 24GB --num-processes N]`: what one device holds
during a training step of a recipe, line by line, and whether it fits."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory of one training step on one device: weights, gradients, optimizer, activations; fits?",
        allow_abbrev=False,
        description="diffalign plan CONFIG.yaml [--key=value ...] [--gpu-memory 24GB] [--num-processes N]: the memory "
                    "one device holds during a step of the recipe (weights by dtype, gradients, optimizer state, the "
                    "DPO reference, EMA / Self-NPO teacher, activations measured on the real architecture and scaled, "
                    "FSDP2 sharding), whether it fits and the largest per-device batch that does. No model is loaded "
                    "and nothing is downloaded: the architectures ship with diffalign (docs/scaling.md).")
    p.add_argument("config", help="YAML recipe (a file or a shipped name); --key=value overrides its keys")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory of one GPU, e.g. 24GB, 80GB (GiB); "
                   "default: say the largest batch for 24, 48 and 80 GB cards")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="processes (GPUs); N > 1 plans FSDP2 sharding (parameters, gradients, optimizer state / N)")
    p.add_argument("--strategy", default="fsdp2", choices=("fsdp2", "ddp"),
                   help="with --num-processes > 1: FSDP2 (sharded, the default) or DDP (every device holds everything)")
    p.add_argument("--optimizer", default=None, choices=("adamw", "adamw8bit", "adafactor"),
                   help="default: the config's (adamw8bit when use_8bit_adam)")
    p.add_argument("--architecture", default=None, help="a shipped architecture (sd15, sdxl, cogvideox-2b, cogvideox-5b) "
                   "when pretrained_model_name_or_path is not one diffalign knows")
    p.add_argument("--frames", type=int, default=None, help="video: frames per clip (default: the native 49)")
    p.add_argument("--without", default="", metavar="PARTS", help="comma-separated parts not held during the step: "
                   "text_encoders, vae (prompt embeddings / latents cached and the encoders dropped)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd, accepts_overrides=True)


def setting_from_args(args):
    from ..planning.architectures import architecture, architecture_for
    from ..planning.memory import Setting
    from .train import train_config

    cfg = train_config(args)
    if not cfg.method:
        raise UserError("the config sets no method: add method: dpo|mapo|npo|sft|selfnpo or --method=...")
    from ..training.methods import get_method

    row = get_method(cfg.method)
    arch = architecture(args.architecture) if args.architecture else architecture_for(cfg.pretrained_model_name_or_path)
    without = tuple(w.strip() for w in args.without.split(",") if w.strip())
    bad = [w for w in without if w not in ("text_encoders", "vae")]
    if bad:
        raise UserError(f"--without takes text_encoders and/or vae, got {', '.join(bad)}")
    return Setting(arch=arch, method=row.name, train_mode=cfg.train_mode, rank=cfg.rank,
                   lora_targets=tuple(cfg.lora_target_modules), gradient_checkpointing=cfg.gradient_checkpointing,
                   mixed_precision=cfg.mixed_precision or "no",
                   optimizer=args.optimizer or ("adamw8bit" if cfg.use_8bit_adam else "adamw"),
                   batch=cfg.train_batch_size, resolution=cfg.resolution, frames=args.frames,
                   use_ema=cfg.use_ema, needs_reference=row.needs_reference(row.keys(cfg)),
                   separate_vae=bool(cfg.pretrained_vae_model_name_or_path), num_processes=args.num_processes,
                   strategy=args.strategy, without=without)


def describe(s) -> str:
    from ..planning.memory import units_per_row

    _, size = units_per_row(s.arch, s.resolution, s.frames)
    mode = f"LoRA rank {s.rank}" if s.train_mode == "lora" else "full fine-tune"
    gc = "gradient checkpointing" if s.gradient_checkpointing else "no gradient checkpointing"
    procs = f"{s.num_processes} processes ({s.strategy.upper()})" if s.num_processes > 1 else "1 process"
    return (f"{s.arch.name}, {s.method}, {mode}, {size.split(':')[0]}, batch {s.batch} per device, mixed precision "
            f"{s.mixed_precision}, {gc}, {s.optimizer}, {procs}")


def alternatives(s, budget: float) -> list[str]:
    """What else would fit: one change at a time, with the largest batch it allows."""
    import dataclasses

    from ..planning.memory import CUDA_RESERVE, plan

    tries = []
    if not s.gradient_checkpointing:
        tries.append(("--gradient_checkpointing=true", dict(gradient_checkpointing=True)))
    if s.optimizer == "adamw" and s.train_mode == "full":
        tries.append(("--use_8bit_adam=true", dict(optimizer="adamw8bit")))
    if s.mixed_precision == "no":
        tries.append(("--mixed_precision=bf16", dict(mixed_precision="bf16")))
    if s.train_mode == "full":
        tries.append(("--train_mode=lora", dict(train_mode="lora")))
    for n in (2, 4, 8):
        if n > s.num_processes and s.train_mode == "full":
            tries.append((f"--num-processes {n} (FSDP2)", dict(num_processes=n, strategy="fsdp2")))
    out = []
    for label, change in tries:
        p = plan(dataclasses.replace(s, **change))
        best = p.largest_batch(budget - CUDA_RESERVE)
        if best >= 1:
            out.append(f"{label}: largest per-device batch {best} ({(p.fixed + p.activation_per_sample) / 2**30:.1f} GiB "
                       "at batch 1)")
    return out


def cmd(args) -> int:
    import json

    from ..planning.memory import CUDA_RESERVE, GiB, parse_size, plan

    if args.num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {args.num_processes}")
    s = setting_from_args(args)
    p = plan(s)
    budgets = [parse_size(args.gpu_memory)] if args.gpu_memory else [24 * GiB, 48 * GiB, 80 * GiB]
    need = p.total + CUDA_RESERVE
    if args.json:
        print(json.dumps({"setting": describe(s), "lines": [vars(x) for x in p.lines], "total": p.total,
                          "cuda_reserve": CUDA_RESERVE, "needs": need,
                          "activation_per_sample": p.activation_per_sample,
                          "largest_batch": {f"{b / GiB:g}GiB": p.largest_batch(b - CUDA_RESERVE) for b in budgets}},
                         indent=1))
        return 0
    print(f"diffalign plan: {describe(s)}\n")
    width = max(len(x.name) for x in p.lines) + 2
    for x in p.lines:
        print(f"  {x.name.ljust(width)}{x.bytes / GiB:8.2f} GiB   {x.note}")
    print(f"  {'total (tensors)'.ljust(width)}{p.total / GiB:8.2f} GiB")
    print(f"  {'+ CUDA reserve'.ljust(width)}{CUDA_RESERVE / GiB:8.2f} GiB   context, kernels, allocator slack (not "
          "measured here)")
    print(f"  {'= one device needs'.ljust(width)}{need / GiB:8.2f} GiB\n")
    for budget in budgets:
        best = p.largest_batch(budget - CUDA_RESERVE)
        head = f"on a {budget / GiB:g} GB device:"
        if need <= budget:
            print(f"{head} FITS at batch {s.batch} ({need / GiB:.1f} of {budget / GiB:g} GiB); largest per-device "
                  f"batch that fits: {best}")
        elif best >= 1:
            print(f"{head} does NOT fit at batch {s.batch} (needs {need / GiB:.1f} GiB); largest per-device batch that "
                  f"fits: {best} (keep the global batch: gradient_accumulation_steps x {s.batch / best:g})")
        else:
            print(f"{head} does NOT fit, not even at batch 1 ({(p.fixed + p.activation_per_sample + CUDA_RESERVE) / GiB:.1f}"
                  f" GiB)")
        if need > budget:
            for line in alternatives(s, budget):
                print(f"  - {line}")
    print("\nActivations are measured (a CPU step of the real architecture, scaled); every other line is parameters x "
          "bytes. docs/scaling.md#memory-planner says what each line holds and how well it matched.")
    return 0
