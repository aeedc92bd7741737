"""The README.md model card written into every training output folder: the pair methods' card (what the weights
are comes from the method table) and Self-NPO's (a negative model, for the negative branch of CFG only)."""

from __future__ import annotations

from pathlib import Path

from ..models.source import resolve_model
from .methods import get_method


def write_model_card(cfg, out: Path, *, resolution: int, family: str, data_summary: str, method=None,
                     keys=None) -> Path:
    """The card of a pair method; ``method`` is its row of the method table (default: ``cfg.method``'s) and
    ``keys`` its config section."""
    if method is None:
        method = get_method(cfg.method)
    keys = method.keys(cfg) if keys is None else keys
    lora = cfg.train_mode == "lora"
    beta = f"beta = {cfg.beta:g} (Diffusion-DPO convention with the 0.5; the diffusers SD1.5 script's beta is twice this)" \
        if cfg.beta is not None else "no beta"
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    base = resolve_model(cfg.pretrained_model_name_or_path)  # 'toy' only means something to diffalign
    usage = (
        f'pipe.load_lora_weights("{out}")  # reads pytorch_lora_weights.safetensors'
        if lora else f'unet = UNet2DConditionModel.from_pretrained("{out}/unet")'
    )
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {cfg.pretrained_model_name_or_path}",
        f"tags: [diffalign, {method.name}, {'lora' if lora else 'full-finetune'}]",
        "---",
        f"# {method.name.upper()} {'LoRA' if lora else 'UNet'} for {cfg.pretrained_model_name_or_path}",
        "",
        f"This is {method.role}, trained with diffalign.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{cfg.pretrained_model_name_or_path}` ({family}) |",
        f"| method | {method.title(keys)} |",
        f"| {'LoRA rank' if lora else 'trained'} | {cfg.rank if lora else 'full UNet'} |",
        f"| beta | {beta} |",
        f"| data | `{cfg.dataset_name}` split `{cfg.dataset_split_name}` ({data_summary}) |",
        f"| steps | {cfg.max_train_steps} x batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps} |",
        f"| learning rate | {cfg.learning_rate:g} ({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}) |",
        f"| resolution | {resolution} |",
        *([f"| caption dropout | a share {cfg.proportion_empty_prompts:g} of the captions replaced by the empty "
           "prompt (proportion_empty_prompts) |"] if cfg.proportion_empty_prompts else []),
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline" + ("" if lora else ", UNet2DConditionModel"),
        f'pipe = DiffusionPipeline.from_pretrained("{base}")',
        usage,
        "```",
    ]
    if grids:
        lines += ["", "## Validation", "", "Top row: trained; bottom row: base (same prompts and seeds).", "",
                  f"![validation]({grids[-1].relative_to(out)})"]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_selfnpo_model_card(cfg, out: Path, *, resolution: int, family: str, data_summary: str) -> Path:
    """README.md saying what the weights are: a NEGATIVE model, for the negative branch of CFG only."""
    lora = cfg.train_mode == "lora"
    base = cfg.pretrained_model_name_or_path
    loadable = resolve_model(base)  # 'toy' -> the shipped folder, so the snippet runs as written
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    load = (f'neg.load_lora_weights("{out}")  # reads pytorch_lora_weights.safetensors: theta_base + delta'
            if lora else f'neg.unet = UNet2DConditionModel.from_pretrained("{out}/unet")  # theta_base + delta')
    huber = f" (c = {cfg.huber_c:g})" if cfg.selfnpo_loss == "pseudo_huber" else ""
    start = ("pure noise and prompts only (data-free)" if cfg.selfnpo_start == "noise"
             else "noised latents of real images")
    start_range = ("official: any grid point, the teacher's steps clipped at t = 0"
                   if cfg.selfnpo_start_range == "official"
                   else f"interior: the top {cfg.ddim_grid - cfg.teacher_steps} grid points, always "
                        f"{cfg.teacher_steps} full steps")
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {base}",
        f"tags: [diffalign, selfnpo, negative-model, {'lora' if lora else 'full-finetune'}]",
        "---",
        f"# Self-NPO negative {'LoRA' if lora else 'UNet'} for {base}",
        "",
        "This is a **NEGATIVE model** (Self-NPO, Wang et al. 2025), trained with diffalign. Use it only in the "
        "unconditional / negative branch of classifier-free guidance, never as the positive model:",
        "",
        "    eps = eps_neg(x, t, c_neg) + g * (eps_pos(x, t, c) - eps_neg(x, t, c_neg))",
        "",
        "with the negative weights composed as `theta_neg = theta_base + alpha*eta + beta*delta` (`delta` = these "
        "weights minus the base, `eta` = an optional positive offset such as a preference LoRA; defaults "
        "alpha = beta = 1). A negative prompt, if any, goes to the negative model.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{base}` ({family}) |",
        f"| method | selfnpo: student regressed onto an EMA teacher's {cfg.teacher_steps}-step DDIM x0 estimate "
        f"({cfg.ddim_grid}-step grid, guidance w = {cfg.teacher_guidance:g}) |",
        f"| trajectories start from | {start} |",
        f"| start range | {start_range} |",
        f"| teacher EMA decay | {cfg.teacher_ema_decay:g} |",
        f"| loss | {cfg.selfnpo_loss}{huber} |",
        f"| {'LoRA rank' if lora else 'trained'} | {cfg.rank if lora else 'full UNet'} |",
        f"| data | {data_summary} |",
        f"| steps | {cfg.max_train_steps} x batch {cfg.train_batch_size} x accumulation "
        f"{cfg.gradient_accumulation_steps} |",
        f"| learning rate | {cfg.learning_rate:g} ({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}) |",
        f"| resolution | {resolution} |",
        "",
        "## Use (negative branch only)",
        "",
        "```python",
        "from diffusers import DiffusionPipeline" + ("" if lora else ", UNet2DConditionModel"),
        f'pipe = DiffusionPipeline.from_pretrained("{loadable}")  # the positive model',
        f'neg = DiffusionPipeline.from_pretrained("{loadable}")   # becomes the negative model',
        load,
        "# at every sampling step: eps = eps_neg + g * (eps_pos - eps_neg),",
        "# eps_pos from pipe.unet with the prompt, eps_neg from neg.unet with the negative prompt ('' if none)",
        "```",
    ]
    if grids:
        lines += ["", "## Validation", "",
                  "Samples of the negative model itself as the positive model (top row; expected to look worse) and "
                  "of the base (bottom row, LoRA only), same prompts and seeds.", "",
                  f"![validation]({grids[-1].relative_to(out)})"]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["write_model_card", "write_selfnpo_model_card"]
