"""`diffalign extract-lora`: a LoRA of chosen rank from a full fine-tune (SVD of tuned - base per layer), with the
share of the difference it keeps."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("extract-lora", help="LoRA of chosen rank from a full fine-tune (SVD of tuned - base per "
                       "Linear/Conv layer), with the share of the difference it keeps")
    p.add_argument("--base", required=True, help="base pipeline folder or hub id; 'toy' for the toy model")
    p.add_argument("--tuned", required=True, help="fine-tuned UNet (or transformer) folder, or a folder with unet/ or "
                   "transformer/ (pipeline, run folder of a full fine-tune, or any of its checkpoint-N folders)")
    p.add_argument("--rank", type=int, required=True,
                   help="LoRA rank: each layer keeps the top-R singular values of its weight difference (all of it "
                   "when R >= that layer's rank); biases and norm weights have no LoRA form and are dropped")
    p.add_argument("--target-modules", default=None, type=lambda v: [t for t in v.split(",") if t],
                   help="comma-separated module names (or name endings, e.g. to_q,to_k,conv1) to decompose; "
                   "default: every Linear and Conv2d layer")
    p.add_argument("--warn-below", type=float, default=90.0,
                   help="warn when the LoRA keeps less than this percent of the squared weight difference (90)")
    p.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..guidance.extract import extract_lora

    out = extract_lora(args.base, args.tuned, args.rank, args.out, target_modules=args.target_modules,
                       warn_below=args.warn_below, warn=lambda m: print(m, file=sys.stderr))
    print(f"wrote {out}")
    return 0
