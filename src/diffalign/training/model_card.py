"""The README.md model card written into every training output folder: the pair methods' card (what the weights
are comes from the method table) and Self-NPO's (a negative model, for the negative branch of CFG only).

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData``, so the hub reads its metadata: the real base model
(``base_model`` only for a hub id: the shipped toy model and a local folder are said in words, never claimed as a
hub id), tags (diffalign, the method, lora or full-finetune, text-to-image), the hub datasets trained on. The card
names no path of the machine it was written on: the usage snippet loads the weights from the hub repo
(push_to_hub) or from "." (the folder holding the card), and local data and base folders appear by name only.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..models.folders import shown
from ..models.source import TOY_MODEL_ALIAS, _looks_like_hub_id
from .methods import get_method

_TOY_BASE = ("diffalign's shipped toy model (`toy`: a 4.1M-parameter StableDiffusionPipeline of 32x32 shapes inside "
             "the diffalign package, not a hub model)")
_ABSOLUTE = re.compile(r"(?<![\w.:/~])(?:[A-Za-z]:\\|/|~/)[^\s'\"`()\[\]{},;]*")


def _is_hub_id(name) -> bool:
    text = str(name)
    return text != TOY_MODEL_ALIAS and _looks_like_hub_id(text) and not Path(text).expanduser().exists()


def _local_name(text: str) -> str:
    return Path(str(text).rstrip("/\\")).name or str(text)


def no_local_paths(text: str) -> str:
    """`text` with every absolute path (/..., ~/..., C:\\...) replaced by its last part."""
    return _ABSOLUTE.sub(lambda m: _local_name(m.group(0)), text)


def _base(cfg) -> tuple[str, str, str | None]:
    """(the base model in words, the snippet that loads it, its hub id or None)."""
    base = str(cfg.pretrained_model_name_or_path)
    if base == TOY_MODEL_ALIAS:
        return _TOY_BASE, "from diffalign.toy.paths import toy_model_path\n" \
            "pipe = DiffusionPipeline.from_pretrained(toy_model_path())", None
    if _is_hub_id(base):
        return f"[`{base}`](https://huggingface.co/{base})", f'pipe = DiffusionPipeline.from_pretrained("{base}")', base
    name = _local_name(base)
    return (f"a local pipeline folder `{name}` (not a hub model)",
            f'pipe = DiffusionPipeline.from_pretrained("path/to/{name}")  # the base pipeline folder', None)


def _base_name(cfg, base_id: str | None) -> str:
    if base_id is not None:
        return base_id
    base = str(cfg.pretrained_model_name_or_path)
    return "the diffalign toy model" if base == TOY_MODEL_ALIAS else _local_name(base)


def _data(cfg, data_summary: str) -> tuple[str, list[str]]:
    """(the training data in words, the hub datasets for the metadata)."""
    name = str(cfg.dataset_name)
    extra = (f", files {', '.join(f'`{p}`' for p in cfg.data_files)}" if cfg.data_files else "") + \
        (", streamed" if getattr(cfg, "streaming", False) else "")
    summary = no_local_paths(data_summary.replace(name, _local_name(name)) if name else data_summary)
    if _is_hub_id(name) and not any(ch in name for ch in "*?["):
        return f"[`{name}`](https://huggingface.co/datasets/{name}) split `{cfg.dataset_split_name}`{extra} " \
               f"({summary})", [name]
    return f"local data `{_local_name(name)}`{extra} ({summary})", []


def _weights_repo(cfg) -> tuple[str, str]:
    """(what the snippet loads the weights from, a comment saying what that is)."""
    if cfg.push_to_hub:
        from .hub_keys import default_hub_model_id

        return default_hub_model_id(cfg), "this hub repo"
    return ".", "the folder holding this card (the run folder)"


def _denoiser(family: str) -> tuple[str, str]:
    """(the pipeline attribute and weights folder of the family's denoiser, its diffusers class): ("unet",
    "UNet2DConditionModel") for SD / SDXL, ("transformer", "SD3Transformer2DModel") for SD3, and so on."""
    from ..models.loading import family_class

    cls = family_class(family)
    return cls.denoiser_name, cls.denoiser_class


def _settings(keys) -> str:
    if keys is None or not dataclasses.is_dataclass(keys):
        return ""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in dataclasses.asdict(keys).items() if v is not None)


def _write(out: Path, cfg, *, family: str, tags: list[str], datasets: list[str], base_id: str | None,
           body: list[str]) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    lora = cfg.train_mode == "lora"
    meta = dict(base_model=base_id, datasets=datasets or None,
                tags=["diffalign", *tags, "lora" if lora else "full-finetune",
                      "text-to-video" if "cogvideo" in family.lower() else "text-to-image"],
                pipeline_tag="text-to-video" if "cogvideo" in family.lower() else "text-to-image")
    if base_id is not None:
        meta["base_model_relation"] = "adapter" if lora else "finetune"
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})
    # library_name first: what the hub (and a reader) looks for first.
    card = ModelCard("---\nlibrary_name: diffusers\n" + data.to_yaml() + "\n---\n" + "\n".join(body) + "\n")
    path = out / "README.md"
    path.write_text(str(card), encoding="utf-8")
    return path


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
    base_text, load_base, base_id = _base(cfg)
    data_text, datasets = _data(cfg, data_summary)
    repo, what = _weights_repo(cfg)
    name, cls = _denoiser(family)
    usage = (
        f'pipe.load_lora_weights("{repo}")  # {what}: reads pytorch_lora_weights.safetensors'
        if lora else f'pipe.{name} = {cls}.from_pretrained("{repo}", subfolder="{name}")  # {what}'
    )
    settings = _settings(keys)
    body = [
        f"# {method.name.upper()} {'LoRA' if lora else shown(name)} for "
        f"{_base_name(cfg, base_id)}",
        "",
        f"This is {method.role}, trained with [diffalign](https://pypi.org/project/diffalign/).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {base_text} ({family}) |",
        f"| method | {method.title(keys)} |",
        *([f"| method settings | {settings} |"] if settings else []),
        f"| {'LoRA rank' if lora else 'trained'} | {cfg.rank if lora else f'full {shown(name)}'} |",
        f"| beta | {beta} |",
        f"| data | {data_text} |",
        f"| steps | {cfg.max_train_steps} x batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps} |",
        f"| learning rate | {cfg.learning_rate:g} ({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}) |",
        f"| resolution | {resolution} |",
        f"| seed | {cfg.seed} |",
        *([f"| caption dropout | a share {cfg.proportion_empty_prompts:g} of the captions replaced by the empty "
           "prompt (proportion_empty_prompts) |"] if cfg.proportion_empty_prompts else []),
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline" + ("" if lora else f", {cls}"),
        load_base,
        usage,
        "```",
    ]
    if grids:
        body += ["", "## Validation", "", "Top row: trained; bottom row: base (same prompts and seeds).", "",
                 f"![validation]({grids[-1].relative_to(out).as_posix()})"]
    return _write(out, cfg, family=family, tags=[method.name], datasets=datasets, base_id=base_id, body=body)


def write_selfnpo_model_card(cfg, out: Path, *, resolution: int, family: str, data_summary: str) -> Path:
    """README.md saying what the weights are: a NEGATIVE model, for the negative branch of CFG only."""
    lora = cfg.train_mode == "lora"
    base_text, load_base, base_id = _base(cfg)
    data_text, datasets = (_data(cfg, data_summary) if cfg.dataset_name not in (None, "", "toy")
                           else (no_local_paths(data_summary), []))
    repo, what = _weights_repo(cfg)
    name, cls = _denoiser(family)
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    load = (f'neg.load_lora_weights("{repo}")  # {what}: pytorch_lora_weights.safetensors, theta_base + delta'
            if lora else f'neg.{name} = {cls}.from_pretrained("{repo}", subfolder="{name}")  # {what}: '
                         "theta_base + delta")
    huber = f" (c = {cfg.huber_c:g})" if cfg.selfnpo_loss == "pseudo_huber" else ""
    start = ("pure noise and prompts only (data-free)" if cfg.selfnpo_start == "noise"
             else "noised latents of real images")
    start_range = ("official: any grid point, the teacher's steps clipped at t = 0"
                   if cfg.selfnpo_start_range == "official"
                   else f"interior: the top {cfg.ddim_grid - cfg.teacher_steps} grid points, always "
                        f"{cfg.teacher_steps} full steps")
    body = [
        f"# Self-NPO negative {'LoRA' if lora else shown(name)} for "
        f"{_base_name(cfg, base_id)}",
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
        f"| base model | {base_text} ({family}) |",
        f"| method | selfnpo: student regressed onto an EMA teacher's {cfg.teacher_steps}-step DDIM x0 estimate "
        f"({cfg.ddim_grid}-step grid, guidance w = {cfg.teacher_guidance:g}) |",
        f"| trajectories start from | {start} |",
        f"| start range | {start_range} |",
        f"| teacher EMA decay | {cfg.teacher_ema_decay:g} |",
        f"| loss | {cfg.selfnpo_loss}{huber} |",
        f"| {'LoRA rank' if lora else 'trained'} | {cfg.rank if lora else f'full {shown(name)}'} |",
        f"| data | {data_text} |",
        f"| steps | {cfg.max_train_steps} x batch {cfg.train_batch_size} x accumulation "
        f"{cfg.gradient_accumulation_steps} |",
        f"| learning rate | {cfg.learning_rate:g} ({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}) |",
        f"| resolution | {resolution} |",
        f"| seed | {cfg.seed} |",
        "",
        "## Use (negative branch only)",
        "",
        "```python",
        "from diffusers import DiffusionPipeline" + ("" if lora else f", {cls}"),
        load_base + "  # the positive model",
        "neg = DiffusionPipeline.from_pretrained(pipe.name_or_path)   # becomes the negative model",
        load,
        "# at every sampling step: eps = eps_neg + g * (eps_pos - eps_neg),",
        f"# eps_pos from pipe.{name} with the prompt, eps_neg from neg.{name} with the negative prompt ('' if none)",
        "```",
    ]
    if grids:
        body += ["", "## Validation", "",
                 "Samples of the negative model itself as the positive model (top row; expected to look worse) and "
                 "of the base (bottom row, LoRA only), same prompts and seeds.", "",
                 f"![validation]({grids[-1].relative_to(out).as_posix()})"]
    return _write(out, cfg, family=family, tags=["selfnpo", "negative-model"], datasets=datasets, base_id=base_id,
                  body=body)


__all__ = ["no_local_paths", "write_model_card", "write_selfnpo_model_card"]
