"""`diffalign export-negative`: write the composed negative UNet base + alpha*eta + beta*delta."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export-negative", help="write the composed negative UNet base + alpha*eta + beta*delta")
    p.add_argument("--model", required=True, help="base pipeline folder or hub id; 'toy' for the toy model")
    p.add_argument("--lora", default=None, help="positive offset eta: LoRA file/folder or UNet folder")
    p.add_argument("--negative-model", required=True, help="negative offset delta: LoRA file/folder or UNet folder")
    p.add_argument("--npo-alpha", type=float, default=1.0)
    p.add_argument("--npo-beta", type=float, default=1.0)
    p.add_argument("--out", required=True, help="output UNet folder (config.json + safetensors)")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..guidance import export_negative_unet
    from ..models import load_pipeline

    pipe = load_pipeline(args.model)
    export_negative_unet(pipe, args.out, negative=args.negative_model, positive=args.lora,
                         alpha=args.npo_alpha, beta=args.npo_beta)
    print(f"wrote the negative UNet to {args.out}")
    return 0
