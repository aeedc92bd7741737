"""Sharded full fine-tuning with FSDP2 (`torch.distributed.fsdp.fully_shard`), applied by diffalign itself.

`accelerate launch --config_file configs/accelerate/fsdp.yaml` starts the processes and exports the config's
`fsdp_config` as environment variables (ACCELERATE_USE_FSDP, FSDP_VERSION, FSDP_TRANSFORMER_CLS_TO_WRAP, ...).
diffalign reads them here (:func:`requested_plan`) and takes the FSDP part away from accelerate, so that
accelerate runs its plain multi-process mode (process group, device, autocast, reductions) on GPUs and CPUs
alike, and this module shards the networks the same way on both: on a CPU machine accelerate has no FSDP mode at
all (it would run DDP), so the path the tests run on CPU processes over gloo is the path GPU users run.

What is sharded (each process holds 1/N of it): the trained network's parameters, their gradients and the AdamW
states (the optimizer is built on the sharded parameters), an EMA (`use_ema`) or the Self-NPO teacher, and the
frozen DPO reference copy; under a LoRA the frozen base and the adapters alike. Each
`fsdp_transformer_layer_cls_to_wrap` block is one unit (gathered for its forward and backward, then freed); the
rest of the network is the root unit.

Checkpoints hold the sharded state as a torch distributed checkpoint (`sharded/`, every process writes its
part); the loadable weights (`unet/` or `transformer/`, or the LoRA file) are gathered to the main process and written whole
(:func:`save_network`, :func:`save_lora`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

# Block classes sharded as units when the accelerate config names none: one per supported model family.
DEFAULT_BLOCKS = ("BasicTransformerBlock", "CogVideoXBlock", "JointTransformerBlock", "FluxTransformerBlock",
                  "FluxSingleTransformerBlock")


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ShardingPlan:
    """The `fsdp_config` of the accelerate config, as diffalign applies it."""

    blocks: tuple[str, ...]
    reshard_after_forward: bool = True

    def describe(self) -> str:
        return (f"FSDP2: parameters, gradients and optimizer states sharded; units: {', '.join(self.blocks)} "
                f"blocks + the root (reshard_after_forward={self.reshard_after_forward})")


def requested_plan() -> ShardingPlan | None:
    """The plan when the launch asked for FSDP (the launcher exported ACCELERATE_USE_FSDP=true), else None.

    Hides the request from accelerate (ACCELERATE_USE_FSDP=false in this process) so that the Accelerator built
    next runs as plain multi-process; settings diffalign does not implement are refused here, before any work.
    """
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise UserError(f"the accelerate config asks for FSDP version {version}: diffalign shards with FSDP2 only; set "
                        "`fsdp_version: 2` in its fsdp_config (configs/accelerate/fsdp.yaml)")
    if _flag("FSDP_OFFLOAD_PARAMS"):
        raise UserError("fsdp_offload_params: true is not supported by diffalign train: set it to false (sharding "
                        "over more GPUs, gradient_checkpointing and mixed_precision: bf16 reduce memory instead)")
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise UserError("fsdp_activation_checkpointing: true is not read by diffalign train: set it to false and put "
                        "`gradient_checkpointing: true` in the training config instead (the same recomputation)")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip()
    if policy not in ("TRANSFORMER_BASED_WRAP", ""):
        raise UserError(f"fsdp_auto_wrap_policy: {policy} is not supported by diffalign train: use "
                        "TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap naming the model's blocks")
    named = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    os.environ["ACCELERATE_USE_FSDP"] = "false"  # accelerate: plain multi-process; the sharding is ours
    return ShardingPlan(blocks=named or DEFAULT_BLOCKS,
                        reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", "true"))


def check_supported(cfg, accelerator) -> None:
    """Refuse, before the model loads, what the sharded path does not do (each with what to do instead)."""
    if str(accelerator.mixed_precision) == "fp16":
        raise UserError("mixed_precision: fp16 is not supported with FSDP (its gradient scaler does not work on "
                        "sharded gradients): use mixed_precision: bf16 (or no)")
    if getattr(cfg, "torch_compile", False):  # main's regional compile: not tried together with fully_shard
        raise UserError("torch_compile with FSDP (configs/accelerate/fsdp.yaml) is not supported yet (the two have not "
                        "been tested together): set torch_compile: false for a sharded run")
    if cfg.use_8bit_adam:
        raise UserError("use_8bit_adam does not work on sharded parameters (bitsandbytes has no FSDP2 support): set "
                        "use_8bit_adam: false; FSDP already splits the AdamW states over the processes")


class Sharder:
    """Applies a plan over one device mesh (every process of the job)."""

    def __init__(self, plan: ShardingPlan, device: torch.device, world: int):
        from torch.distributed.device_mesh import init_device_mesh

        self.plan = plan
        self.mesh = init_device_mesh(torch.device(device).type, (world,))

    def __call__(self, module: torch.nn.Module, *, frozen: bool = False) -> torch.nn.Module:
        """Shard `module` in place: each block of the plan's classes, then the root. A frozen module (the DPO
        reference, the Self-NPO teacher) is always freed after its forward: it has no backward to keep it for."""
        from torch.distributed.fsdp import fully_shard

        reshard = True if frozen else self.plan.reshard_after_forward
        blocks = [m for m in module.modules() if type(m).__name__ in self.plan.blocks and m is not module]
        if not blocks:
            raise UserError(f"the {type(module).__name__} has no block of the classes the accelerate config names "
                            f"({', '.join(self.plan.blocks)}): set fsdp_transformer_layer_cls_to_wrap to its block "
                            "class (e.g. BasicTransformerBlock for a UNet, CogVideoXBlock for CogVideoX)")
        for block in reversed(blocks):  # innermost first, as fully_shard requires
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard)
        fully_shard(module, mesh=self.mesh, reshard_after_forward=reshard)
        return module


def autocast_forward(module: torch.nn.Module, accelerator) -> None:
    """What `accelerator.prepare(model)` does to the trained network under mixed precision, which a sharded one does
    not go through (prepare would wrap it in DDP): its forward runs under autocast and returns float32 outputs, on
    every call (validation sampling too), as under DDP."""
    if str(accelerator.mixed_precision) not in ("bf16", "fp16"):
        return
    from accelerate.utils import convert_outputs_to_fp32

    inner = module.forward

    def forward(*args, **kwargs):
        with accelerator.autocast():
            return inner(*args, **kwargs)

    module.forward = convert_outputs_to_fp32(forward)


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm(params, max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` over sharded gradients: the global L2 norm (each process's sum of squares,
    summed over processes), and every gradient scaled by min(1, max_norm / norm). Returns the norm (inf/nan when
    a gradient is not finite, which the NaN guard reads)."""
    import torch.distributed as dist

    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    # On the parameters' device even without gradients: every process joins the all-reduce (NCCL needs CUDA tensors).
    sq = torch.zeros((), dtype=torch.float64, device=local(params[0]).device if params else torch.device("cpu"))
    for g in grads:  # per-tensor norms in float32, as torch's clip_grad_norm_; their squares summed in float64
        sq += torch.linalg.vector_norm(local(g).detach(), dtype=torch.float32).double() ** 2
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq)
    norm = math.sqrt(float(sq)) if math.isfinite(float(sq)) else float(sq)
    if math.isfinite(norm) and max_norm:
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for g in grads:
                local(g).mul_(coef)
    return norm


def save_network(module: torch.nn.Module, folder: str | Path) -> None:
    """`module.save_pretrained(folder)`; a sharded module is gathered to the main process first (every process
    must call this: the gather is collective) and written there whole: config.json and
    diffusion_pytorch_model.safetensors, loadable by `from_pretrained`."""
    if not is_sharded(module):
        module.save_pretrained(folder)
        return
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        module.save_config(folder)
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    del state


def save_lora(family, out: str | Path) -> None:
    """`family.save_lora(out)`; with a sharded UNet its trainable weights (the adapters) are gathered to the main
    process first (every process must call this) and written there."""
    if not is_sharded(family.unet):
        family.save_lora(out)
        return
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(family.unet, options=options)
    if dist.get_rank() == 0:
        family.save_lora(out, state_dict=state)


# ----------------------------------------------------------------------------------- checkpoint state
SHARDED_DIR = "sharded"


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _state_options():
    """Trainable weights only (under a LoRA the frozen base is the pretrained model: not saved, not restored)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def sharded_state(net, optimizer, extra: dict | None) -> dict:
    """The state a sharded checkpoint holds: the network's trainable and the optimizer's sharded state dicts
    (parameter names as keys) and `extra` (an EMA's or the teacher's sharded tensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(net, _inner(optimizer), options=_state_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    if extra is not None:
        state["extra"] = dict(extra)
    return state


def save_sharded(folder: Path, net, optimizer, extra: dict | None) -> None:
    """Every process writes its part of the state into `folder/sharded` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(net, optimizer, extra), checkpoint_id=str(Path(folder) / SHARDED_DIR))


def load_sharded(folder: Path, net, optimizer, extra: dict | None) -> None:
    """Restore `net`, `optimizer` and `extra` (in place) from `folder/sharded` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(net, optimizer, extra)
    try:
        dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    except Exception as exc:  # DCP wraps every rank's failure in its own exception type
        raise UserError(f"the sharded state in '{folder}' does not match this run ({str(exc).splitlines()[0][:200]}): "
                        "resume with the same model, method and use_ema, or from another checkpoint") from None
    # Not strict about the frozen weights (left out on purpose); every trainable one was read above: DCP raises
    # for a key the checkpoint lacks.
    set_state_dict(net, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_options())
    if extra is not None:
        with torch.no_grad():
            for name, value in state["extra"].items():
                if value is not extra[name]:
                    extra[name].copy_(value)


__all__ = ["DEFAULT_BLOCKS", "SHARDED_DIR", "Sharder", "ShardingPlan", "autocast_forward", "check_supported",
           "clip_grad_norm",
           "is_sharded", "load_sharded", "requested_plan", "save_lora", "save_network", "save_sharded"]
