"""What one device holds during a training step: the arithmetic of `diffalign plan`.

Every line is bytes = parameters (counted on the meta device from the shipped architectures) x bytes per parameter,
except the activations, which are measured (benchmarks/real_shapes.py: one step of the real architecture on the CPU)
and scaled by rows x size (planning/activations.json). The lines, and when each is there:

- weights: the denoiser with its floating buffers (trained: float32; under a LoRA: the frozen dtype, plus the float32
  adapters), the text encoders and the VAE in the frozen dtype (fp16/bf16 under mixed precision; the VAE float32 when
  its config asks for force_upcast and no separate VAE is given), as `diffalign train` stores them (training/setup.py);
- gradients: float32, one per trainable parameter;
- optimizer state: AdamW 2 float32 moments (8 B per trainable parameter); 8-bit AdamW 2 bytes (tensors under 4096
  elements stay 32-bit, as bitsandbytes does; its block scales add 0.2%); Adafactor (no first moment) a row and a
  column float32 vector per matrix, a full float32 vector for other tensors;
- autocast copies: under fp16/bf16 mixed precision autocast keeps a half copy of each trained float32 weight for
  the whole forward and backward (2 B per trainable parameter);
- DPO reference (dpo, npo with its dpo objective): a LoRA's is the network with its adapters off (nothing); a full
  fine-tune's a frozen copy of the starting denoiser in the frozen dtype;
- EMA (use_ema): a float32 copy of the trained weights; Self-NPO teacher: a float32 copy of the denoiser (full) or of
  the adapters (LoRA);
- activations: bytes per (row x unit) x rows x units; rows: 2 per pair for dpo/mapo/npo (winner and loser in one
  batch), 1 per sample for sft and selfnpo; units: latent pixels (H/8 x W/8) for a UNet, tokens (F' x H'/2 x W'/2 +
  226 text tokens) for CogVideoX;
- DDP over N processes (strategy ddp): every line as for one process, plus DDP's gradient buckets (a float32 copy of
  the gradients);
- FSDP2 over N processes (arithmetic only): the denoiser's weights, the gradients, the optimizer state, the reference,
  EMA and teacher copies divided by N; the text encoders, the VAE, the activations and the gathered units (the
  largest block, twice: the one computing and the one prefetched) are not.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import UserError
from .architectures import TEXT_TOKENS, Architecture, build, parameter_count

GiB = 2 ** 30
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
ACTIVATIONS_FILE = Path(__file__).parent / "activations.json"
#: Device memory a CUDA process holds besides tensors (context, kernels, allocator slack): a reserve, not measured.
CUDA_RESERVE = 1.5 * GiB
#: Rows with gradient per unit of train_batch_size.
ROWS = {"dpo": 2, "mapo": 2, "npo": 2, "sft": 1, "selfnpo": 1}


@dataclass
class Setting:
    """The settings a plan depends on (from a config and the command line by commands/plan.py `setting_from_args`)."""

    arch: Architecture
    method: str = "mapo"
    train_mode: str = "lora"
    rank: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    optimizer: str = "adamw"
    batch: int = 1
    resolution: int | None = None
    frames: int | None = None
    use_ema: bool = False
    needs_reference: bool = False
    separate_vae: bool = False
    num_processes: int = 1
    strategy: str = "fsdp2"  # with num_processes > 1: "fsdp2" (sharded) or "ddp" (replicated, gradient buckets)
    without: tuple[str, ...] = ()  # components not resident ("text_encoders", "vae")


@dataclass
class Line:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    setting: Setting
    lines: list[Line] = field(default_factory=list)
    activation_per_sample: float = 0.0

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines)

    @property
    def fixed(self) -> float:
        return self.total - self.activation_per_sample * self.setting.batch

    def line(self, name: str) -> float:
        return sum(x.bytes for x in self.lines if x.name.startswith(name))

    def largest_batch(self, budget: float) -> int:
        """The largest per-device train_batch_size whose step fits in `budget` bytes (0: not even 1)."""
        if self.activation_per_sample <= 0:
            return 0
        return max(0, int((budget - self.fixed) // self.activation_per_sample))


# ---------------------------------------------------------------------------------------------- counting
def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


@lru_cache(maxsize=None)
def _denoiser_shapes(file: str) -> tuple:
    """(name, in, out, kernel) of the denoiser's Linear/Conv layers and every parameter's shape."""
    import torch

    net = build(file, device="meta")
    layers = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear):
            layers.append((name, m.in_features, m.out_features, 1))
        elif isinstance(m, torch.nn.Conv2d):
            layers.append((name, m.in_channels, m.out_channels, m.kernel_size[0] * m.kernel_size[1]))
    shapes = tuple(tuple(p.shape) for p in net.parameters())
    blocks = []
    for attr in ("down_blocks", "up_blocks", "transformer_blocks"):
        blocks += [sum(p.numel() for p in b.parameters()) for b in getattr(net, attr, [])]
    if getattr(net, "mid_block", None) is not None:
        blocks.append(sum(p.numel() for p in net.mid_block.parameters()))
    # floating buffers (CogVideoX-2b's sinusoidal position table for the native 49 x 480 x 720 clip: 34 M values),
    # stored in the weights' dtype
    buffers = sum(b.numel() for b in net.buffers() if b.is_floating_point())
    return tuple(layers), shapes, max(blocks) if blocks else 0, buffers


def lora_parameters(file: str, rank: int, targets) -> int:
    """Parameters of a peft LoRA of `rank` on the layers named `targets` (A: in x r, B: r x out)."""
    return sum(math.prod(s) for s in _lora_shapes(file, rank, targets))


def optimizer_bytes(optimizer: str, shapes) -> float:
    """Optimizer state of trainable tensors of these shapes."""
    if optimizer == "adamw":
        return 8.0 * sum(math.prod(s) for s in shapes)
    if optimizer == "adamw8bit":
        small = sum(math.prod(s) for s in shapes if math.prod(s) < 4096)
        large = sum(math.prod(s) for s in shapes if math.prod(s) >= 4096)
        return 8.0 * small + 2.0 * large * (1 + 4 / 2048)
    if optimizer == "adafactor":
        total = 0
        for s in shapes:
            if len(s) >= 2:
                total += math.prod(s[:-1]) + math.prod(s[:-2] + s[-1:])
            else:
                total += math.prod(s)
        return 4.0 * total
    raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def _lora_shapes(file: str, rank: int, targets) -> list[tuple]:
    """The shapes of a peft LoRA's A and B matrices on the layers named `targets`."""
    layers = _denoiser_shapes(file)[0]
    out = []
    for name, fan_in, fan_out, kernel in layers:
        if _matches(name, targets):
            out += [(rank, fan_in * kernel), (fan_out, rank)]
    if not out:
        raise UserError(f"lora_target_modules={list(targets)} matches no layer of {file}")
    return out


# ------------------------------------------------------------------------------------------- activations
@lru_cache(maxsize=None)
def activation_table() -> dict:
    return json.loads(ACTIVATIONS_FILE.read_text(encoding="utf-8"))


def units_per_row(arch: Architecture, resolution: int | None, frames: int | None) -> tuple[int, str]:
    """The size activations scale with, per row: latent pixels (UNet) or tokens (CogVideoX); and how it was reached."""
    if arch.family == "cogvideox":
        height, width = (resolution, resolution) if resolution else arch.native_size
        frames = frames or arch.native_frames
        if (frames - 1) % 4:
            raise UserError(f"CogVideoX clips have 4k+1 frames (1, 5, ..., 49), got {frames}")
        latent_frames = (frames - 1) // 4 + 1
        tokens = latent_frames * (height // 16) * (width // 16) + TEXT_TOKENS["cogvideox"]
        return tokens, f"{frames} frames of {height}x{width}: {tokens} tokens"
    side = (resolution or arch.native_resolution) // 8
    return side * side, f"{resolution or arch.native_resolution} px: latents {side}x{side}"


def activation_bytes_per_sample(s: Setting, table: dict | None = None) -> tuple[float, str]:
    """Activation bytes of one sample (a pair: 2 rows) and how they were reached; `table`: activations.json's
    contents (default: the shipped file)."""
    table = table if table is not None else activation_table()
    key = "checkpointing" if s.gradient_checkpointing else "no_checkpointing"
    entry = table["architectures"].get(s.arch.name, {}).get(key)
    if entry is None:
        raise UserError(f"no activation measurement for {s.arch.name} ({key}) in {ACTIVATIONS_FILE.name}: "
                        "run benchmarks/real_shapes.py")
    per_unit = float(entry["bytes_per_row_unit"])
    factor, how = 1.0, entry["source"]
    if s.mixed_precision in ("fp16", "bf16"):
        factor = float(table["half_precision_factor"]["value"])
        how += f"; x{factor:g} for {s.mixed_precision} autocast ({table['half_precision_factor']['source']})"
    units, size = units_per_row(s.arch, s.resolution, s.frames)
    rows = ROWS.get(s.method, 2)
    return per_unit * factor * units * rows, f"{rows} row(s) a sample x {size}; {how}"


# ------------------------------------------------------------------------------------------------- plan
def plan(s: Setting, activations: dict | None = None) -> Plan:
    """The memory of one device during a step of `s` (see the module docstring for each line); `activations`: a
    table in the form of activations.json (default: the shipped one)."""
    if s.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {s.optimizer!r}")
    if s.num_processes < 1 or s.batch < 1:
        raise UserError("num_processes and train_batch_size must be >= 1")
    if s.strategy not in ("fsdp2", "ddp"):
        raise UserError(f"strategy must be fsdp2 or ddp, got {s.strategy!r}")
    from ..training.setup import frozen_weight_dtype

    arch, procs = s.arch, int(s.num_processes)
    n = procs if s.strategy == "fsdp2" else 1
    frozen = frozen_weight_dtype(s.mixed_precision).itemsize  # 2 under fp16/bf16, else 4
    half = frozen == 2
    frozen_name = s.mixed_precision if half else "float32"
    shard = f" / {n} (FSDP2)" if n > 1 else ""
    p = Plan(s)
    layers_shapes = _denoiser_shapes(arch.denoiser)
    net = sum(math.prod(shape) for shape in layers_shapes[1])
    buffers = layers_shapes[3]
    with_buffers = f" + {buffers / 1e6:,.0f} M buffer values" if buffers > 1e6 else ""
    if s.train_mode == "lora":
        shapes = _lora_shapes(arch.denoiser, s.rank, s.lora_targets)
        trainable = sum(math.prod(shape) for shape in shapes)
        p.lines.append(Line("weights: denoiser (frozen)", (net + buffers) * frozen / n,
                            f"{net / 1e6:,.0f} M{with_buffers} x {frozen} B ({frozen_name}){shard}"))
        p.lines.append(Line("weights: LoRA (trained)", trainable * 4 / n,
                            f"{trainable / 1e6:,.2f} M x 4 B (float32), rank {s.rank}{shard}"))
    else:
        trainable, shapes = net, list(layers_shapes[1])
        p.lines.append(Line("weights: denoiser (trained)", (net + buffers) * 4 / n,
                            f"{net / 1e6:,.0f} M{with_buffers} x 4 B (float32){shard}"))
    if "text_encoders" not in s.without:
        for f in arch.text_encoders:
            c = parameter_count(f)
            p.lines.append(Line(f"weights: text encoder {f.removesuffix('.json')}", c * frozen,
                                f"{c / 1e6:,.0f} M x {frozen} B ({frozen_name})"))
    if "vae" not in s.without:
        c = parameter_count(arch.vae)
        vae_b = 4 if (arch.vae_upcast and not s.separate_vae) else frozen
        why = " (force_upcast)" if vae_b == 4 and half else ""
        p.lines.append(Line("weights: VAE", c * vae_b, f"{c / 1e6:,.0f} M x {vae_b} B{why}"))
    p.lines.append(Line("gradients", trainable * 4 / n, f"{trainable / 1e6:,.2f} M x 4 B (float32){shard}"))
    opt = optimizer_bytes(s.optimizer, shapes)
    p.lines.append(Line(f"optimizer state ({s.optimizer})", opt / n, f"{opt / max(trainable, 1):.2f} B per trainable "
                        f"parameter{shard}"))
    if half:
        p.lines.append(Line("autocast copies of trained weights", trainable * 2,
                            f"{trainable / 1e6:,.2f} M x 2 B ({s.mixed_precision}), held from forward to backward"))
    if s.needs_reference:
        ref = 0.0 if s.train_mode == "lora" else (net + buffers) * frozen / n
        note = "the network with its adapters off: no copy" if s.train_mode == "lora" else \
            f"frozen copy of the denoiser, {net / 1e6:,.0f} M x {frozen} B{shard}"
        p.lines.append(Line("DPO reference", ref, note))
    if s.use_ema:
        p.lines.append(Line("EMA copy", trainable * 4 / n, f"{trainable / 1e6:,.2f} M x 4 B{shard}"))
    if s.method == "selfnpo":
        p.lines.append(Line("Self-NPO teacher", trainable * 4 / n,
                            ("an EMA of the adapters" if s.train_mode == "lora" else "a float32 copy of the denoiser")
                            + f", {trainable / 1e6:,.2f} M x 4 B{shard}"))
    if procs > 1 and s.strategy == "ddp":
        p.lines.append(Line("DDP gradient buckets", trainable * 4, "a float32 copy of the gradients for the all-reduce "
                            "(gradient_as_bucket_view off, torch's default)"))
    if n > 1:
        block = layers_shapes[2]
        gathered = frozen
        p.lines.append(Line("FSDP2 gathered units", 2 * block * gathered,
                            f"the largest block ({block / 1e6:,.0f} M) x {gathered} B, computing + prefetched"))
    per_sample, how = activation_bytes_per_sample(s, activations)
    p.activation_per_sample = per_sample
    p.lines.append(Line("activations", per_sample * s.batch, f"batch {s.batch} x {per_sample / GiB:.3f} GiB; {how}"))
    return p


def parse_size(text: str) -> float:
    """'24GB', '80 GiB', '24' (GB) -> bytes. GB here means 2^30 bytes, as GPU memory is quoted (a '24 GB' card
    holds 24 GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([GMT]i?B?)?\s*", str(text), flags=re.I)
    if not m:
        raise UserError(f"--gpu-memory: cannot read {text!r}; write e.g. 24GB or 80GB")
    value, unit = float(m.group(1)), (m.group(2) or "G")[0].upper()
    return value * {"M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit]


__all__ = ["CUDA_RESERVE", "GiB", "Line", "OPTIMIZERS", "Plan", "Setting", "activation_bytes_per_sample",
           "lora_parameters", "optimizer_bytes", "parse_size", "plan", "units_per_row"]
