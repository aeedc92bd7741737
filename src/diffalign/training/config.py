"""``TrainConfig``: every setting of ``diffalign train``, one dataclass for the CLI, YAML and Python.

Flag names follow the diffusers training scripts wherever one exists (``--pretrained_model_name_or_path``,
``--gradient_accumulation_steps``, ``--resume_from_checkpoint latest``, ...). Load with
:func:`diffalign.config_loader.load_config`, then call :meth:`TrainConfig.validate` before any model loads.

The keys are flat, in groups: the common ones (below) and each method's own section (sections.py), the
sections of every method of the method table (methods.py). Validation reads the table: a key of another
method's section, set to anything but its default, is refused; the method's own rules run next; then the
common keys' checks.

beta convention (docs/methods.md#diffusion-dpo): the original Diffusion-DPO code, with the 0.5 inside the logit,
``L = -log sigmoid(-0.5 * beta * ((err_w - err_l) - (ref_w - ref_l)))``. The diffusers SD1.5 DPO script
drops the 0.5, so its ``--beta_dpo 2500`` is ``beta: 5000`` here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from diffalign.config_loader import check_types
from diffalign.errors import UserError

from . import methods as _methods
from .sections import key, section_keys

# The names diffusers.optimization.get_scheduler takes without extra arguments we do not expose.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


_f = key


@dataclass
class _WhatToTrain:
    method: Optional[str] = _f(None, _methods.help_text())
    pretrained_model_name_or_path: Optional[str] = _f(
        None, "Base pipeline (required): a hub id, a local diffusers folder, or 'toy' for the shipped toy model.")
    pretrained_vae_model_name_or_path: Optional[str] = _f(
        None, "A separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16. "
        "none: the pipeline's own VAE.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: Optional[str] = _f(None, "Weight variant of the base model files, e.g. fp16.")


@dataclass
class _Data:
    dataset_name: Optional[str] = _f(
        None, "Preference data (required): a hub dataset id, a local dataset folder, or a parquet file or "
        "glob (data/*.parquet). Pick-a-Pic schema by default: caption, jpg_0, jpg_1, label_0, label_1. "
        "selfnpo: the prompts (caption_column) - also a .txt file (one prompt a line), a .jsonl file, or "
        "'toy' for the toy world's training prompts; with selfnpo_start=images, image-caption data "
        "(one image column, see image_columns).")
    dataset_split_name: str = _f("train", "Split to train on (the diffusers DPO script's default 'validation' "
                                 "is a known trap; Pick-a-Pic v2 has train/validation/test/test_unique).")
    caption_column: str = _f("caption", "Column holding the prompt.")
    proportion_empty_prompts: float = _f(
        0.0, "Caption dropout for the pair methods (dpo, mapo, npo, sft): the share of training samples, in [0, 1], "
        "whose caption is replaced by the empty prompt \"\" (both images of a pair), so the model also learns the "
        "preference in the unconditional branch. 0.0 as in the diffusers scripts; the original Diffusion-DPO code "
        "uses 0.2. Which samples are dropped depends only on (seed, step, sample), so a resumed or multi-process "
        "run drops the same ones; the count is logged per step as empty_prompts.")
    image_columns: tuple[str, ...] = _f(
        ("jpg_0", "jpg_1"), "Image columns (encoded image bytes or paths): two for a pair; sft also takes one; "
        "selfnpo_start=images takes exactly one (e.g. image, or jpg_0 of Pick-a-Pic); selfnpo_start=noise "
        "reads no images.")
    label_columns: tuple[str, ...] = _f(
        ("label_0", "label_1"), "Preference label columns matching image_columns (1 = preferred, 0.5 = tie).")
    ties: Literal["drop", "error"] = _f(
        "drop", "Pairs labelled a tie (0.5/0.5, ~12% of Pick-a-Pic): drop them (the DPO paper's choice) or stop "
        "with an error. Never silently 'image 0 wins'.")
    strict_data: bool = _f(
        False, "true: stop at the first invalid row (unreadable image, missing caption, labels outside "
        "{0, 0.5, 1}, image below min_image_size), naming its row, column and reason; false: skip such rows, count "
        "them per reason and report the counts (train_report.json). Empty captions are kept and counted.")
    min_image_size: Optional[int] = _f(
        None, "Refuse images whose shorter side is below this many pixels (strict_data: stop; otherwise: skip and "
        "count as image_too_small); set it to resolution to never upsample. none: any size (upsampled, as the "
        "Diffusion-DPO SDXL run did with the smaller Pick-a-Pic images).")
    max_train_samples: Optional[int] = _f(None, "Use only the first N rows (after dropping ties), for debugging.")
    resolution: Optional[int] = _f(
        None, "Training image size in pixels (multiple of 8). none: the model's native size (512 SD1.5, "
        "1024 SDXL, 32 toy). Both images of a pair are resized the same way, never one to the other's size.")
    random_flip: bool = _f(False, "Randomly flip images horizontally; a pair is always flipped together.")
    center_crop: bool = _f(False, "Center-crop to resolution; false: a random crop, shared by both images of a pair.")
    use_cache: Literal["auto", True, False] = _f(
        "auto", "Encode latents and prompt embeddings once and reuse them across steps. auto: for a local dataset, "
        "build (or reuse) the cache and train from it, with the flipped view of every pair when random_flip is on "
        "(the same batches as the pixel path); random crops (center_crop: false with room to crop), streamed or hub "
        "data train on pixels, said once in the log. Pairs whose images cannot be used are counted when the cache "
        "is built, against max_skipped_share. true: the cache without flips (centre crop, never flipped). "
        "false: always pixels.")
    cache_dir: Optional[str] = _f(
        None, "Folder of the latent/embedding cache (use_cache). none: a 'cache' folder inside output_dir. "
        "Not the hub download cache (set HF_HOME for that).")
    image_root: Optional[str] = _f(
        None, "For parquet / hub data whose image cells hold file paths instead of bytes: the folder those files "
        "must be in (relative paths are relative to it). Paths outside it, and any path when it is not set, are "
        "refused, as image folders refuse names outside themselves.")
    max_skipped_share: float = _f(
        1.0, "Images that fail when fetched (undecodable, too small) are skipped and counted; when they reach this "
        "share of an epoch's rows (or, at the end of a shorter run, of the rows fetched) the run stops with an "
        "error instead of finishing on data it could not read. In (0, 1]; 1.0: only a whole epoch of failures.")
    dataloader_num_workers: int = _f(
        0, "Threads that decode and augment the next micro-batches while one trains (images only; a latent cache "
        "needs none); 0 loads in the main thread. The batches are the same for any value.")
    streaming: bool = _f(
        False, "Pair methods: read the rows as a stream (datasets' streaming=True) instead of downloading the whole "
        "dataset first; for hub datasets and parquet files (docs/streaming.md). Rows are validated and skips "
        "counted as without streaming; max_train_samples then reads only that many rows.")
    shuffle_buffer_size: int = _f(
        1000, "streaming: the rows come through a shuffle buffer of this size, seeded by seed (+ epoch); 0: stream "
        "order. Without streaming the whole dataset is shuffled and this is not read.")
    data_files: tuple[str, ...] = _f(
        (), "Only these files of a hub dataset (patterns inside its repo, e.g. "
        "'data/train-0000[0-4]-of-*.parquet' for 5 shards of Pick-a-Pic v2), with or without streaming.")


@dataclass
class _Optimisation:
    train_batch_size: int = _f(4, "Pairs (or images for sft) per device per step.")
    gradient_accumulation_steps: int = _f(1, "Steps to accumulate before each optimizer update.")
    learning_rate: float = _f(1e-5, "Peak learning rate (before scale_lr).")
    scale_lr: bool = _f(
        False, "Multiply learning_rate by gradient_accumulation_steps x train_batch_size x number of processes, "
        "as the diffusers scripts do (the released Diffusion-DPO launchers use 1e-8 with this: 2.048e-5 at 2048).")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = _f("constant", "Schedule, by diffusers.optimization.get_scheduler name.")
    lr_warmup_steps: int = _f(0, "Warm-up steps (constant_with_warmup, linear, cosine, ...; not constant).")
    lr_num_cycles: int = _f(1, "Hard restarts of cosine_with_restarts.")
    lr_power: float = _f(1.0, "Power of the polynomial schedule.")
    max_train_steps: int = _f(2000, "Optimizer updates in all (the DPO, MaPO and NPO papers use 2000).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (pip install 'diffalign[bnb]'; needs a GPU).")
    max_grad_norm: Optional[float] = _f(1.0, "Clip the gradient norm to this; none: no clipping.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the UNet.")
    torch_compile: bool = _f(
        False, "Compile the denoiser's repeated blocks with torch.compile (regional compilation: the transformer "
        "blocks, compiled once per distinct shape, so compiling takes seconds to minutes, not the whole network); "
        "LoRA layers inside the blocks are compiled with them. The first steps are slower while it compiles.")
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _f(
        "default", "torch.compile mode for torch_compile (reduce-overhead uses CUDA graphs on a GPU).")
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = _f(
        None, "no, fp16 or bf16; none: whatever `accelerate config` / accelerate launch set. Trained weights "
        "stay float32; frozen ones (text encoders, VAE unless it asks for force_upcast, the UNet under a LoRA, "
        "the DPO reference) are stored in fp16/bf16.")


@dataclass
class _WhatIsTrained:
    train_mode: Literal["lora", "full"] = _f(
        "lora", "lora: train a LoRA on the UNet (output pytorch_lora_weights.safetensors); full: fine-tune "
        "the whole UNet or transformer (output a unet/ folder, or transformer/ for SD3, FLUX and CogVideoX, "
        "as in a pipeline folder).")
    rank: int = _f(8, "LoRA rank (train_mode=lora).")
    lora_alpha: Optional[float] = _f(None, "LoRA alpha; none: equal to rank (scale 1).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: tuple[str, ...] = _f(
        ("to_q", "to_k", "to_v", "to_out.0"), "UNet modules that get LoRA (the NPO and MaPO LoRA runs' choice).")
    use_ema: bool = _f(False, "Keep an EMA copy of the trained UNet and save it (train_mode=full only).")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer update.")


@dataclass
class _FlowMatching:
    weighting_scheme: Literal["none", "logit_normal", "mode"] = _f(
        "none", "Flow-matching models (sd3, flux) only: how training timesteps are drawn, as the diffusers SD3/FLUX "
        "scripts offer it. none: uniform over the scheduler's sigmas; logit_normal: sigmoid of N(logit_mean, "
        "logit_std^2) (the SD3 paper's choice, the SD3 script's default); mode: the SD3 paper's mode density "
        "with mode_scale. One timestep per pair, shared by winner and loser.")
    logit_mean: float = _f(0.0, "Mean of the logit-normal timestep density (weighting_scheme=logit_normal).")
    logit_std: float = _f(1.0, "Standard deviation of the logit-normal timestep density (weighting_scheme="
                          "logit_normal).")
    mode_scale: float = _f(1.29, "Scale of the mode timestep density (weighting_scheme=mode).")
    guidance_scale: float = _f(
        1.0, "FLUX-dev only (a transformer with guidance embeddings): the guidance value every training call "
        "gets, as the diffusers FLUX scripts pass it (they default to 1.0 or 3.5). Not the sampling CFG scale "
        "(validation_guidance_scale).")


@dataclass
class _Run:
    output_dir: Optional[str] = _f(None, "Run folder (required): weights, checkpoints, logs, resolved config.")
    logging_dir: str = _f("logs", "Tracker log folder, relative to output_dir unless absolute.")
    overwrite_output_dir: bool = _f(
        False, "Allow a fresh run into an output_dir holding a finished run (its weights and metrics are replaced); "
        "without it that is refused.")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer updates.")
    checkpoints_total_limit: Optional[int] = _f(None, "Keep at most this many checkpoints; none: keep all.")
    resume_from_checkpoint: Optional[str] = _f(
        None, "Resume exactly: 'latest' (the newest checkpoint in output_dir; starts fresh if there is none), "
        "a checkpoint folder path, or a checkpoint name inside output_dir (checkpoint-500).")
    max_consecutive_nonfinite: int = _f(
        5, "A NaN/inf loss or gradient skips that optimizer update (a warning, counted in metrics.jsonl and "
        "train_report.json); this many in a row stop the run, naming the step and the last good checkpoint.")
    seed: int = _f(0, "Random seed for noise, timesteps, data order and initialisation.")
    report_to: Literal["tensorboard", "wandb", "none"] = _f("tensorboard", "Tracker for metrics and images.")
    tracker_project_name: str = _f("diffalign", "Project name the tracker files the run under (wandb project, "
                                   "tensorboard run folder), as in the diffusers scripts.")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere and newer GPUs (faster, slightly less exact), as "
                          "the diffusers scripts' --allow_tf32; no effect on CPU.")
    validation_prompts: tuple[str, ...] = _f(
        (), "Prompts sampled every validation_steps. On the command line: comma-separated, or a YAML list "
        "such as '[\"a cat, sitting\", \"a dog\"]' when prompts contain commas.")
    validation_steps: int = _f(500, "Sample validation_prompts every N optimizer updates.")
    validation_guidance_scale: float = _f(7.5, "CFG scale of the validation images.")
    validation_num_inference_steps: int = _f(25, "Sampler steps of the validation images.")
    validation_seed: int = _f(0, "Seed of the validation images (prompt i gets seed + i, the same each time).")
    push_to_hub: bool = _f(
        False, "At the end, upload the final weights, the model card and the last validation grid to hub_model_id "
        "(created if missing). The token comes from HF_TOKEN or `hf auth login`, never from the config.")
    hub_model_id: Optional[str] = _f(
        None, "Hub repo of push_to_hub, 'name' (under your account) or 'namespace/name'; none: the name of "
        "output_dir. Recorded as the full namespace/name once the run has created the repo.")
    hub_push_checkpoints: bool = _f(
        False, "push_to_hub: also upload each checkpoint's weights (checkpoint-N/ in the repo, in the background); "
        "the resume state (optimizer, ...) stays local.")


@dataclass
class TrainConfig(_Run, *reversed(_methods.sections()), _FlowMatching, _WhatIsTrained, _Optimisation, _Data,
                  _WhatToTrain):
    """Settings of one training run. Method, model, dataset and output folder have no default: give them.

    The keys, in order: what to train, data, optimisation, what is trained, each method's section (sections.py,
    in method-table order), checkpoints / logging / validation.
    """

    def __post_init__(self):
        if isinstance(self.method, str):  # `method: DPO` in a YAML file is dpo
            self.method = self.method.strip().lower()

    # --- derived values ---------------------------------------------------------------------------------
    def method_row(self) -> "_methods.Method":
        """This config's row of the method table (methods.py)."""
        return _methods.get_method(self.method)

    def section(self):
        """This config's method section (sections.py): the keys its method reads."""
        return self.method_row().keys(self)

    def global_batch_size(self, num_processes: int = 1) -> int:
        """Pairs per optimizer update: ``train_batch_size * gradient_accumulation_steps * num_processes``."""
        return self.train_batch_size * self.gradient_accumulation_steps * int(num_processes)

    def scaled_learning_rate(self, num_processes: int = 1) -> float:
        """``learning_rate``, times :meth:`global_batch_size` when ``scale_lr`` (the diffusers scripts' rule)."""
        return self.learning_rate * self.global_batch_size(num_processes) if self.scale_lr else self.learning_rate

    def resolve_resume_path(self) -> Optional[Path]:
        """The folder ``resume_from_checkpoint`` names, as given or inside ``output_dir`` (the diffusers
        scripts' habit: ``checkpoint-500``); None if it is unset, ``latest`` or does not exist."""
        resume = self.resume_from_checkpoint
        if resume in (None, "", "latest"):
            return None
        for candidate in (Path(resume), Path(self.output_dir or ".") / resume):
            if candidate.is_dir():
                return candidate
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- checks -----------------------------------------------------------------------------------------
    @staticmethod
    def translate_key(key: str, raw, source: str):
        """Keys of the diffusers training scripts (ported.py): their equivalents here, or a refusal."""
        from .ported import translate_ported_key

        return translate_ported_key(key, raw, source)

    def validate(self) -> "TrainConfig":
        """Raise :class:`UserError` naming the key for a missing or impossible setting; return self.

        Cheap and offline: runs before any model or dataset loads. The only filesystem look is whether a
        ``resume_from_checkpoint`` path exists.
        """
        check_types(self)
        self._validate_finite()
        for name, what in (
            ("method", "|".join(_methods.method_names())),
            ("pretrained_model_name_or_path", "HUB_ID_OR_FOLDER (or toy)"),
            ("dataset_name", "HUB_ID_OR_FOLDER_OR_PARQUET"),
            ("output_dir", "FOLDER"),
        ):
            if getattr(self, name) in (None, ""):
                raise UserError(f"{name} is not set: pass --{name}={what} or set it in the YAML file")
        self._validate_method()
        self._validate_data()
        self._validate_optimisation()
        self._validate_model()
        self._validate_run()
        from .hub_keys import check_hub_and_streaming

        check_hub_and_streaming(self)
        return self

    def _validate_finite(self) -> None:
        import math

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name} must be a finite number, got {value}")

    def _validate_method(self) -> None:
        """The method table's rules: other methods' keys left at their defaults, then the method's own checks."""
        row = self.method_row()
        own = set(section_keys(row.section))
        for f in dataclasses.fields(self):
            if f.name in own or not _methods.owners(f.name):
                continue
            value = getattr(self, f.name)
            if value != f.default:
                where = f.metadata.get("applies_to") or "method=" + "/".join(_methods.owners(f.name))
                raise UserError(f"{f.name}={value} only applies to {where}; method={row.name} does not read it: "
                                "remove it")
        row.check(row.keys(self), self)
        if self.proportion_empty_prompts and not row.pairs:
            raise UserError(f"proportion_empty_prompts={self.proportion_empty_prompts} applies to the pair methods "
                            f"({', '.join(_methods.pair_methods())}); method={row.name} trains on its prompts as given "
                            "(add empty lines to the prompts to train on the empty prompt): remove it")

    def _validate_data(self) -> None:
        row = self.method_row()
        n_img = len(self.image_columns)
        if row.image_columns and n_img not in row.image_columns:
            need = "exactly 2 columns (a pair)" if row.image_columns == (2,) else \
                " or ".join(map(str, row.image_columns)) + " columns"
            raise UserError(f"image_columns needs {need} for {row.name}, got {list(self.image_columns)}")
        if n_img == 2 and len(self.label_columns) != 2 and row.pairs:
            raise UserError(f"label_columns needs 2 columns matching image_columns, got {list(self.label_columns)}")
        if len(set(self.image_columns)) != n_img:
            raise UserError(f"image_columns names a column twice: {list(self.image_columns)}")
        if not self.caption_column:
            raise UserError("caption_column is empty")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UserError(f"max_train_samples must be >= 1 (or none), got {self.max_train_samples}")
        if self.max_train_samples is not None and self.max_train_samples < self.train_batch_size:
            raise UserError(f"max_train_samples={self.max_train_samples} is smaller than one batch "
                            f"(train_batch_size={self.train_batch_size}): raise it or lower train_batch_size")
        if self.dataset_name == "toy" and row.pairs:
            prompt_methods = "/".join(m.name for m in _methods.methods() if not m.pairs)
            raise UserError(f"dataset_name=toy is the toy world's prompts (no images, no preference labels), which "
                            f"only method={prompt_methods} can use; method={self.method} needs pairs: render some "
                            "with `diffalign toy render-pairs --out pairs.parquet` and pass "
                            "--dataset_name=pairs.parquet")
        if self.min_image_size is not None and self.min_image_size < 1:
            raise UserError(f"min_image_size must be >= 1 (or none: any size), got {self.min_image_size}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(f"resolution must be a positive multiple of 8 (or none for native), got {self.resolution}")
        if self.dataloader_num_workers < 0:
            raise UserError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if not 0 < self.max_skipped_share <= 1:
            raise UserError(f"max_skipped_share must be in (0, 1] (the share of an epoch's rows whose images may "
                            f"fail to load before the run stops), got {self.max_skipped_share}")
        p = self.proportion_empty_prompts
        if not 0 <= p <= 1:
            raise UserError(f"proportion_empty_prompts must be in [0, 1] (the share of captions replaced by the empty "
                            f"prompt; 0 = none, 0.2 = the original Diffusion-DPO code), got {p}")

    def _validate_optimisation(self) -> None:
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lr_num_cycles"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "adam_epsilon", "lr_power"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_weight_decay < 0:
            raise UserError(f"adam_weight_decay must be >= 0, got {self.adam_weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"max_grad_norm must be > 0 (or none: no clipping), got {self.max_grad_norm}")
        if self.lr_warmup_steps < 0:
            raise UserError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise UserError(f"lr_warmup_steps={self.lr_warmup_steps} has no effect with lr_scheduler=constant: "
                            "use --lr_scheduler=constant_with_warmup or --lr_warmup_steps=0")
        if self.lr_warmup_steps >= self.max_train_steps and self.lr_warmup_steps:
            raise UserError(f"lr_warmup_steps={self.lr_warmup_steps} is not below max_train_steps="
                            f"{self.max_train_steps}: the run would never reach the peak learning rate")

    def _validate_model(self) -> None:
        if self.train_mode == "lora":
            if self.rank < 1:
                raise UserError(f"rank must be >= 1 for train_mode=lora, got {self.rank}")
            if self.lora_alpha is not None and not self.lora_alpha > 0:
                raise UserError(f"lora_alpha must be > 0 (or none: equal to rank), got {self.lora_alpha}")
            if not 0 <= self.lora_dropout < 1:
                raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_target_modules:
                raise UserError("lora_target_modules is empty: LoRA would train nothing")
            if self.use_ema:
                raise UserError("use_ema applies to train_mode=full (an EMA copy of the fine-tuned UNet, saved in "
                                "its place, as in the diffusers scripts); an EMA of LoRA adapters is not supported: "
                                "set --use_ema=false or --train_mode=full")
        if not 0 < self.ema_decay < 1:
            raise UserError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not self.logit_std > 0:
            raise UserError(f"logit_std must be > 0, got {self.logit_std}")
        if not self.guidance_scale > 0:
            raise UserError(f"guidance_scale must be > 0, got {self.guidance_scale}")

    def _validate_run(self) -> None:
        from ..safety.seeds import seed_problem

        for name in ("seed", "validation_seed"):
            problem = seed_problem(getattr(self, name), name)
            if problem:
                raise UserError(problem)
        if self.checkpointing_steps < 1:
            raise UserError(f"checkpointing_steps must be >= 1, got {self.checkpointing_steps}")
        if self.max_consecutive_nonfinite < 1:
            raise UserError(f"max_consecutive_nonfinite must be >= 1 (stop after that many skipped non-finite "
                            f"steps in a row), got {self.max_consecutive_nonfinite}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise UserError("checkpoints_total_limit must be >= 1 (or none: keep all), "
                            f"got {self.checkpoints_total_limit}")
        resume = self.resume_from_checkpoint
        if resume not in (None, "", "latest") and self.resolve_resume_path() is None:
            raise UserError(f"resume_from_checkpoint '{resume}' is not an existing checkpoint folder (nor one "
                            f"inside output_dir '{self.output_dir}'): pass a checkpoint-N folder, or 'latest'")
        for name in ("validation_steps", "validation_num_inference_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.validation_guidance_scale < 0:
            raise UserError(f"validation_guidance_scale must be >= 0, got {self.validation_guidance_scale}")
        if any(not p.strip() for p in self.validation_prompts):
            raise UserError("validation_prompts has an empty prompt")


def register_method(method: _methods.Method, *, replace: bool = False) -> _methods.Method:
    """Add a row to the method table. Its section's keys must be keys of ``TrainConfig`` with the same defaults
    (a YAML file sets them flat); a name already in the table is refused unless ``replace``."""
    if not dataclasses.is_dataclass(method.section):
        raise TypeError(f"method {method.name!r}: section must be a dataclass, got {method.section!r}")
    name = method.name
    if not name or name != name.strip().lower():
        raise ValueError(f"method names are lower case without spaces, got {name!r}")
    if name in _methods.method_names() and not replace:
        raise ValueError(f"method {name!r} is already in the table (pass replace=True to replace it)")
    flat = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(method.section):
        if f.name not in flat or flat[f.name].default != f.default:
            raise ValueError(f"method {name!r}: its section's key {f.name!r} is not a TrainConfig key with the "
                             "same default: add the section to TrainConfig's bases (training/config.py)")
    return _methods.add_row(method)


__all__ = ["LR_SCHEDULERS", "TrainConfig", "register_method"]
