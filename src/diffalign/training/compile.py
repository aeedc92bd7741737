"""Regional compilation of the denoiser (`torch_compile: true`).

Compiling a whole UNet or transformer with `torch.compile` takes minutes and breaks on the Python-side control
flow diffusers and peft use between blocks; the repeated blocks (the transformer blocks, which hold the
attention layers and, under LoRA, the adapter layers) are where the time goes and are identical in code. Each
block is compiled in place (`nn.Module.compile`), so the module tree, parameter names, state dicts, peft's
adapter switches and gradient checkpointing are unchanged: checkpoints, exports and the DPO reference (adapters
switched off, which dynamo guards on and compiles once more) work as without compilation.

Blocks of one class share their code, and dynamo compiles it once per distinct input shape and adapter state,
so the recompile limit is raised to cover every block of the network.
"""

from __future__ import annotations

import torch

from ..errors import UserError

#: Block classes compiled per denoiser class, for classes that do not name their own `_repeated_blocks`.
REPEATED_BLOCKS = {
    "UNet2DConditionModel": ("BasicTransformerBlock",),
    "CogVideoXTransformer3DModel": ("CogVideoXBlock",),
    "SD3Transformer2DModel": ("JointTransformerBlock",),
}


def repeated_block_names(net: torch.nn.Module) -> tuple[str, ...]:
    """The class names of `net`'s repeated blocks: its own `_repeated_blocks` (diffusers), else the table above."""
    own = tuple(getattr(net, "_repeated_blocks", None) or ())
    return own or REPEATED_BLOCKS.get(type(net).__name__, ())


def compile_repeated_blocks(net: torch.nn.Module, mode: str = "default") -> int:
    """Compile every repeated block of `net` in place; returns how many. UserError when it has none."""
    names = repeated_block_names(net)
    blocks = [m for m in net.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"torch_compile: no repeated blocks ({', '.join(names) or 'none known'}) found in "
                        f"{type(net).__name__}; set --torch_compile=false")
    import torch._dynamo

    limit = max(int(torch._dynamo.config.recompile_limit), 4 * len(blocks) + 8)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(int(torch._dynamo.config.accumulated_recompile_limit),
                                                           4 * limit)
    kwargs = {} if mode == "default" else {"mode": mode}
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)
