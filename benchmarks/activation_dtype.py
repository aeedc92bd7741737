"""How much smaller a step's saved activations are under bf16 autocast than in float32 (the planner's
half_precision_factor): the bytes autograd saves for backward in one forward of the real SD1.5 UNet with a LoRA,
counted with torch.autograd.graph.saved_tensors_hooks (each storage once, weights excluded; autocast's
half copies of the float32 LoRA weights count, they are what bf16 holds), float32 against bf16 frozen weights +
float32 LoRA under torch.autocast(bfloat16) - what `mixed_precision: bf16` runs. Forward only (what is saved is
known when the forward ends); 2 rows (a pair) at a small latent size, because bf16 matmuls are ~55x slower than
float32 on this AVX2 CPU.

    taskset -c 1 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/activation_dtype.py [--resolution 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffalign.models.lora import add_lora
from diffalign.planning.architectures import build


def saved_bytes(unet, x, t, cond, autocast: bool) -> int:
    seen, total = set(), [0]
    for p in unet.parameters():  # weights are saved for backward too, but they are not activations
        seen.add((p.untyped_storage().data_ptr(), p.dtype))

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unet(x, t, encoder_hidden_states=cond).sample
    del out
    return total[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    side = args.resolution // 8
    torch.manual_seed(0)
    x, t, cond = torch.randn(2, 4, side, side), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    results = {}
    for name, dtype, autocast in (("float32", torch.float32, False), ("bf16 autocast", torch.bfloat16, True)):
        unet = build("sd15_unet.json", device="cpu", dtype=dtype)
        add_lora(unet, 8, None, ("to_q", "to_k", "to_v", "to_out.0"), "default", 0.0)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        t0 = time.time()
        results[name] = saved_bytes(unet, x, t, cond, autocast)
        print(f"{name}: {results[name] / 2**20:.1f} MiB saved for backward ({time.time() - t0:.0f} s)", flush=True)
        del unet
    print(f"ratio bf16/float32 at {args.resolution} px: {results['bf16 autocast'] / results['float32']:.3f}")


if __name__ == "__main__":
    main()
