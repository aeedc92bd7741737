"""`diffalign export`: a LoRA written by `diffalign train` in the keys other tools read (kohya / ComfyUI / A1111)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a LoRA for other tools (kohya / ComfyUI / A1111 keys)")
    p.add_argument("--lora", required=True, help="a LoRA folder or .safetensors written by diffalign train (a run "
                   "folder or any of its checkpoint-N folders)")
    p.add_argument("--format", choices=["kohya"], default="kohya")
    p.add_argument("--out", default=None, help="output .safetensors (default: beside the input, *_kohya.safetensors)")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    from ..training.export import export_kohya

    print(f"wrote {export_kohya(args.lora, args.out)}")
    return 0
