"""`diffalign extract-lora`: a LoRA of chosen rank from a full fine-tune (SVD of tuned - base)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("extract-lora", help="LoRA of chosen rank from a full fine-tune (SVD of tuned - base)")
    p.add_argument("--base", required=True, help="base pipeline folder or hub id; 'toy' for the toy model")
    p.add_argument("--tuned", required=True, help="fine-tuned UNet folder (or pipeline folder with unet/)")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank (exact when >= the difference's rank)")
    p.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..guidance import extract_lora

    print(f"wrote {extract_lora(args.base, args.tuned, args.rank, args.out)}")
    return 0
