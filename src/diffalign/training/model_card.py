"""The README.md model card written into every training output folder."""

from __future__ import annotations

from pathlib import Path

_ROLE = {
    "dpo": "a preference-aligned model (Diffusion-DPO, Wallace et al. 2023)",
    "mapo": "a preference-aligned model (MaPO, Hong et al. 2024; no reference model)",
    "sft": "a model fine-tuned on the preferred images only (SFT baseline)",
    "npo": "a NEGATIVE model (Diffusion-NPO, Wang et al. 2025): use it only in the unconditional/negative branch "
           "of classifier-free guidance, never as the positive model",
}


def write_model_card(cfg, out: Path, *, resolution: int, family: str, data_summary: str) -> Path:
    lora = cfg.train_mode == "lora"
    beta = f"beta = {cfg.beta:g} (Diffusion-DPO convention with the 0.5; the diffusers SD1.5 script's beta is twice this)" \
        if cfg.beta is not None else "no beta"
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    base = cfg.pretrained_model_name_or_path
    if base == "toy":  # the shorthand only means something to diffalign: give diffusers the real folder
        from ..toy.paths import toy_model_path

        base = str(toy_model_path())
    usage = (
        f'pipe.load_lora_weights("{out}")  # reads pytorch_lora_weights.safetensors'
        if lora else f'unet = UNet2DConditionModel.from_pretrained("{out}/unet")'
    )
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {cfg.pretrained_model_name_or_path}",
        f"tags: [diffalign, {cfg.method}, {'lora' if lora else 'full-finetune'}]",
        "---",
        f"# {cfg.method.upper()} {'LoRA' if lora else 'UNet'} for {cfg.pretrained_model_name_or_path}",
        "",
        f"This is {_ROLE[cfg.method]}, trained with diffalign.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{cfg.pretrained_model_name_or_path}` ({family}) |",
        f"| method | {cfg.method}" + (f" (objective {cfg.npo_objective} on swapped pairs)" if cfg.method == "npo" else "")
        + (f" (preset {cfg.mapo_preset})" if cfg.method == "mapo" else "") + " |",
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
