"""``TrainConfig``: every setting of ``diffalign train``, one dataclass for the CLI, YAML and Python.

Flag names follow the diffusers training scripts wherever one exists (``--pretrained_model_name_or_path``,
``--gradient_accumulation_steps``, ``--resume_from_checkpoint latest``, ...). Load with
:func:`diffalign.config_loader.load_config`, then call :meth:`TrainConfig.validate` before any model loads.

beta convention (docs/methods.md#diffusion-dpo): the original Diffusion-DPO code, with the 0.5 inside the logit,
``L = -log sigmoid(-0.5 * beta * ((err_w - err_l) - (ref_w - ref_l)))``. The diffusers SD1.5 DPO script
drops the 0.5, so its ``--beta_dpo 2500`` is ``beta: 5000`` here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from diffalign.config_loader import check_types
from diffalign.errors import UserError

METHODS = ("dpo", "mapo", "npo", "sft", "selfnpo")
# The names diffusers.optimization.get_scheduler takes without extra arguments we do not expose.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _f(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Settings of one training run. Method, model, dataset and output folder have no default: give them."""

    # --- what to train ------------------------------------------------------------------------------
    method: Optional[Literal["dpo", "mapo", "npo", "sft", "selfnpo"]] = _f(
        None, "Training method (required): dpo = Diffusion-DPO (needs the frozen reference: for LoRA the base "
        "with adapters off); mapo = MaPO (reference-free, one UNet pass per step); npo = Diffusion-NPO "
        "(a negative model: a preference objective on swapped pairs, see npo_objective); sft = plain "
        "fine-tuning on the preferred images; selfnpo = Self-NPO (a negative model learned from the model "
        "itself, no preference labels: see the selfnpo_* / teacher_* keys).")
    pretrained_model_name_or_path: Optional[str] = _f(
        None, "Base pipeline (required): a hub id, a local diffusers folder, or 'toy' for the shipped toy model.")
    pretrained_vae_model_name_or_path: Optional[str] = _f(
        None, "A separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16. "
        "none: the pipeline's own VAE.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: Optional[str] = _f(None, "Weight variant of the base model files, e.g. fp16.")

    # --- data -----------------------------------------------------------------------------------------
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
    use_cache: bool = _f(False, "Encode latents and prompt embeddings once and reuse them across steps.")
    cache_dir: Optional[str] = _f(
        None, "Folder of the latent/embedding cache (use_cache). none: a 'cache' folder inside output_dir. "
        "Not the hub download cache (set HF_HOME for that).")
    dataloader_num_workers: int = _f(
        0, "Threads that decode and augment the next micro-batches while one trains (images only; a latent cache "
        "needs none); 0 loads in the main thread. The batches are the same for any value.")

    # --- optimisation -----------------------------------------------------------------------------------
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
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = _f(
        None, "no, fp16 or bf16; none: whatever `accelerate config` / accelerate launch set. Trained weights "
        "stay float32; frozen ones (text encoders, VAE unless it asks for force_upcast, the UNet under a LoRA, "
        "the DPO reference) are stored in fp16/bf16.")

    # --- what is trained --------------------------------------------------------------------------------
    train_mode: Literal["lora", "full"] = _f(
        "lora", "lora: train a LoRA on the UNet (output pytorch_lora_weights.safetensors); full: fine-tune "
        "the whole UNet (output a unet/ folder).")
    rank: int = _f(8, "LoRA rank (train_mode=lora).")
    lora_alpha: Optional[float] = _f(None, "LoRA alpha; none: equal to rank (scale 1).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: tuple[str, ...] = _f(
        ("to_q", "to_k", "to_v", "to_out.0"), "UNet modules that get LoRA (the NPO and MaPO LoRA runs' choice).")

    # --- objective --------------------------------------------------------------------------------------
    beta: Optional[float] = _f(
        None, "Inverse temperature. DPO and NPO (required): the original Diffusion-DPO convention with the 0.5, "
        "L = -log sigmoid(-0.5*beta*(...)); the diffusers SD1.5 script drops the 0.5, so its beta_dpo 2500 is "
        "5000 here. Paper values: 2000 SD1.5 and 5000 SDXL (DPO); 1000 SD1.5 and 2000 SDXL (NPO). MaPO: only "
        "with mapo_preset=paper (8 general, 64 style/safety, 1024 personalization).")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = _f(
        "sigmoid", "DPO/NPO loss on the logit: sigmoid (the paper), hinge or ipo.")
    mapo_preset: Literal["official", "paper"] = _f(
        "official", "MaPO constants: official = the released code (scale 0.5, k 1000, weight 0.1; no beta); "
        "paper = paper v2 (scale 1, k = beta, weight = 1/beta; needs beta).")
    npo_objective: Literal["dpo", "mapo"] = _f(
        "dpo", "The preference objective NPO runs on swapped pairs: dpo (the NPO paper; uses beta and the "
        "reference) or mapo (reference-free; uses mapo_preset).")
    use_ema: bool = _f(False, "Keep an EMA copy of the trained UNet and save it (train_mode=full only).")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer update.")

    # --- Self-NPO (method=selfnpo; docs/methods.md#self-npo) ---------------------------------------------
    selfnpo_start: Literal["noise", "images"] = _f(
        "noise", "Where the teacher's trajectories start. noise: data-free, prompts only (the paper's claim): "
        "pure noise at the top of the DDIM grid, lower starts reached by the teacher's own denoising from "
        "noise; images: noised latents of real image-caption data at t_start (what the official code does).")
    selfnpo_start_range: Literal["official", "interior"] = _f(
        "official", "Which start points t_start = g[i] the teacher's K steps may start from, on the ddim_grid g "
        "(N points; T-1 at the top). official (the official training code): i uniform over all N points, the K "
        "steps clipped at t = 0 (the grid extended by t = 0, the end at min(i+K, N)), so about K/N of the samples "
        "end at t = 0 and the student's s is then uniform on 1..T-1; interior: i uniform over 0..N-1-K, always K "
        "full steps, no trajectory starts below g[N-1-K] nor ends below the lowest grid point (239 and 39 for "
        "N = 25, K = 5).")
    teacher_ema_decay: float = _f(
        0.999, "Decay of the teacher, an EMA of the student initialised at the base model, updated after every "
        "optimizer step (LoRA: an EMA of the adapter weights on the shared base UNet).")
    teacher_guidance: float = _f(
        -1.0, "Teacher guidance w in pred = cond + w*(cond - uncond): -1 = unconditional (official SD1.5), "
        "-5 (official SDXL); 0 = conditional.")
    ddim_grid: int = _f(25, "Steps of the DDIM grid the teacher walks on (trailing spacing: T-1 is the top).")
    teacher_steps: int = _f(
        5, "K: DDIM steps the teacher takes from x_{t_start} to x_t per training step (fewer near t = 0 with "
        "selfnpo_start_range=official). A sample costs its steps + 1 teacher network calls; the batch steps "
        "together (see diffalign.training.selfnpo for the count, also with selfnpo_start=noise).")
    selfnpo_loss: Literal["pseudo_huber", "l2"] = _f(
        "pseudo_huber", "Distance between the student's x0 prediction at (x_s, s, caption) and the teacher's "
        "x0 estimate at (x_t, t): pseudo_huber (official, see huber_c) or l2 (per-element mean squared error).")
    huber_c: float = _f(1e-3, "c of the pseudo-Huber distance sqrt(d^2 + c^2) - c, per element (official 1e-3).")

    # --- checkpoints, logging, validation ---------------------------------------------------------------
    output_dir: Optional[str] = _f(None, "Run folder (required): weights, checkpoints, logs, resolved config.")
    logging_dir: str = _f("logs", "Tracker log folder, relative to output_dir unless absolute.")
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
    validation_prompts: tuple[str, ...] = _f(
        (), "Prompts sampled every validation_steps. On the command line: comma-separated, or a YAML list "
        "such as '[\"a cat, sitting\", \"a dog\"]' when prompts contain commas.")
    validation_steps: int = _f(500, "Sample validation_prompts every N optimizer updates.")
    validation_guidance_scale: float = _f(7.5, "CFG scale of the validation images.")
    validation_num_inference_steps: int = _f(25, "Sampler steps of the validation images.")
    validation_seed: int = _f(0, "Seed of the validation images (prompt i gets seed + i, the same each time).")

    # --- derived values ---------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        """True when the objective compares against the frozen reference model (DPO, NPO with dpo)."""
        return self.method == "dpo" or (self.method == "npo" and self.npo_objective == "dpo")

    @property
    def objective_name(self) -> Optional[str]:
        """Registry name (``diffalign.objectives.get_objective``) of the loss this config trains with."""
        if self.method == "npo":
            return "npo" if self.npo_objective == "dpo" else "mapo"
        return self.method

    @property
    def swap_pairs(self) -> bool:
        """True for NPO: winner and loser trade places (``npo_loss`` does this itself; MaPO needs it done)."""
        return self.method == "npo"

    @property
    def uses_mapo(self) -> bool:
        return self.objective_name == "mapo"

    @property
    def effective_beta(self) -> Optional[float]:
        """The ``beta`` the objective receives, or None when it takes none (sft, MaPO official preset).

        DPO/NPO: ``beta`` in the original Diffusion-DPO convention (the logit is ``-0.5*beta*(...)``; the
        diffusers-script value is ``beta / 2``, see :attr:`beta_diffusers_convention`). MaPO paper preset:
        ``k = beta``, ``weight = 1/beta``.
        """
        if self.needs_reference or (self.uses_mapo and self.mapo_preset == "paper"):
            return self.beta
        return None

    @property
    def beta_diffusers_convention(self) -> Optional[float]:
        """DPO/NPO beta as the diffusers SD1.5 DPO script writes it (no 0.5): ``beta / 2``."""
        return self.beta / 2 if self.needs_reference and self.beta is not None else None

    def objective_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``get_objective(self.objective_name)`` besides the errors."""
        if self.needs_reference:
            return {"beta": self.beta, "loss_type": self.loss_type}
        if self.uses_mapo:
            kwargs: dict[str, Any] = {"preset": self.mapo_preset}
            if self.mapo_preset == "paper":
                kwargs["beta"] = self.beta
            return kwargs
        return {}

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
    def validate(self) -> "TrainConfig":
        """Raise :class:`UserError` naming the key for a missing or impossible setting; return self.

        Cheap and offline: runs before any model or dataset loads. The only filesystem look is whether a
        ``resume_from_checkpoint`` path exists.
        """
        check_types(self)
        self._validate_finite()
        for key, what in (
            ("method", "dpo|mapo|npo|sft"),
            ("pretrained_model_name_or_path", "HUB_ID_OR_FOLDER (or toy)"),
            ("dataset_name", "HUB_ID_OR_FOLDER_OR_PARQUET"),
            ("output_dir", "FOLDER"),
        ):
            if getattr(self, key) in (None, ""):
                raise UserError(f"{key} is not set: pass --{key}={what} or set it in the YAML file")
        self._validate_objective()
        self._validate_data()
        self._validate_optimisation()
        self._validate_model()
        self._validate_run()
        return self

    def _validate_finite(self) -> None:
        import math

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name} must be a finite number, got {value}")

    def _validate_objective(self) -> None:
        m = self.method
        self._validate_selfnpo()
        if self.npo_objective != "dpo" and m != "npo":
            raise UserError(f"npo_objective={self.npo_objective} only applies to method=npo (method is {m})")
        if self.beta is not None and not self.beta > 0:
            raise UserError(f"beta must be > 0, got {self.beta}")
        if self.needs_reference:
            what = "DPO" if m == "dpo" else "NPO (npo_objective=dpo)"
            if self.beta is None:
                hint = "2000 SD1.5, 5000 SDXL" if m == "dpo" else "1000 SD1.5, 2000 SDXL"
                raise UserError(f"beta is required for {what}: pass --beta=... (paper values: {hint}; "
                                "original convention with the 0.5)")
            if self.mapo_preset != "official":
                raise UserError(f"mapo_preset={self.mapo_preset} only applies to MaPO; {what} ignores it: remove it")
        elif self.loss_type != "sigmoid":
            raise UserError(f"loss_type={self.loss_type} only applies to DPO/NPO with a reference; "
                            f"method={m}{' with npo_objective=mapo' if m == 'npo' else ''} has no such choice")
        if self.uses_mapo:
            if self.mapo_preset == "paper" and self.beta is None:
                raise UserError("beta is required with mapo_preset=paper: pass --beta=8 (general preference), "
                                "64 (style/safety) or 1024 (personalization)")
            if self.mapo_preset == "official" and self.beta is not None:
                raise UserError("beta does not apply to mapo_preset=official (fixed k=1000, weight=0.1): remove "
                                "beta, or pass --mapo_preset=paper to use k = beta, weight = 1/beta")
        if m == "sft":
            if self.beta is not None:
                raise UserError("beta does not apply to method=sft: remove it (or pass --beta=none)")
            if self.mapo_preset != "official":
                raise UserError(f"mapo_preset={self.mapo_preset} only applies to MaPO, not method=sft")

    def _validate_data(self) -> None:
        n_img = len(self.image_columns)
        if self.method == "selfnpo":
            if self.selfnpo_start == "images" and n_img != 1:
                raise UserError(f"image_columns needs exactly 1 column for selfnpo_start=images (one image per "
                                f"caption), got {list(self.image_columns)}: pass e.g. --image_columns=image "
                                "(or --image_columns=jpg_0 for Pick-a-Pic)")
        elif self.method == "sft":
            if n_img not in (1, 2):
                raise UserError(f"image_columns needs 1 or 2 columns for sft, got {list(self.image_columns)}")
        elif n_img != 2:
            raise UserError(f"image_columns needs exactly 2 columns (a pair) for {self.method}, "
                            f"got {list(self.image_columns)}")
        if n_img == 2 and len(self.label_columns) != 2 and self.method != "selfnpo":
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
        if self.dataset_name == "toy" and self.method != "selfnpo":
            raise UserError(f"dataset_name=toy is the toy world's prompts (no images, no preference labels), which "
                            f"only method=selfnpo can use; method={self.method} needs pairs: render some with "
                            "`diffalign toy render-pairs --out pairs.parquet` and pass --dataset_name=pairs.parquet")
        if self.min_image_size is not None and self.min_image_size < 1:
            raise UserError(f"min_image_size must be >= 1 (or none: any size), got {self.min_image_size}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(f"resolution must be a positive multiple of 8 (or none for native), got {self.resolution}")
        if self.dataloader_num_workers < 0:
            raise UserError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        p = self.proportion_empty_prompts
        if not 0 <= p <= 1:
            raise UserError(f"proportion_empty_prompts must be in [0, 1] (the share of captions replaced by the empty "
                            f"prompt; 0 = none, 0.2 = the original Diffusion-DPO code), got {p}")
        if p and self.method == "selfnpo":
            raise UserError(f"proportion_empty_prompts={p} applies to the pair methods (dpo, mapo, npo, sft); "
                            "method=selfnpo trains on its prompts as given (add empty lines to the prompts to "
                            "train on the empty prompt): remove it")

    _SELFNPO_KEYS = ("selfnpo_start", "selfnpo_start_range", "teacher_ema_decay", "teacher_guidance", "ddim_grid",
                     "teacher_steps", "selfnpo_loss", "huber_c")

    def _validate_selfnpo(self) -> None:
        m = self.method
        if m != "selfnpo":
            defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in self._SELFNPO_KEYS}
            changed = [k for k, v in defaults.items() if getattr(self, k) != v]
            if changed:
                raise UserError(f"{changed[0]}={getattr(self, changed[0])} only applies to method=selfnpo "
                                f"(method is {m}): remove it")
            return
        if self.beta is not None:
            raise UserError("beta does not apply to method=selfnpo (no preference logit): remove it")
        if self.mapo_preset != "official":
            raise UserError(f"mapo_preset={self.mapo_preset} only applies to MaPO, not method=selfnpo")
        if self.use_ema:
            raise UserError("use_ema does not apply to method=selfnpo: its teacher is already an EMA of the "
                            "student (teacher_ema_decay) and the student is saved; set --use_ema=false")
        if self.ties != "drop":
            raise UserError(f"ties={self.ties} is about preference pairs; method=selfnpo reads no labels: remove it")
        if tuple(self.label_columns) != ("label_0", "label_1"):
            raise UserError(f"label_columns={list(self.label_columns)} names preference labels, and method=selfnpo "
                            "learns from the model itself without labels: remove label_columns (or train a "
                            "preference method: dpo, mapo, npo)")
        if self.use_cache:
            raise UserError("use_cache (the preference-pair latent cache) does not apply to method=selfnpo: "
                            "set --use_cache=false")
        if self.selfnpo_start == "images" and self.dataset_name == "toy":
            raise UserError("dataset_name=toy gives prompts only, and selfnpo_start=images needs image-caption data: "
                            "pass a parquet/dataset with an image and a caption column, or --selfnpo_start=noise")
        if self.teacher_steps < 1:
            raise UserError(f"teacher_steps must be >= 1 (the teacher must take a step), got {self.teacher_steps}")
        if self.ddim_grid < self.teacher_steps + 1:
            raise UserError(f"ddim_grid={self.ddim_grid} is too coarse for teacher_steps={self.teacher_steps}: "
                            "the grid needs at least teacher_steps + 1 points")
        if not 0 <= self.teacher_ema_decay < 1:
            raise UserError(f"teacher_ema_decay must be in [0, 1), got {self.teacher_ema_decay}")
        if not self.huber_c > 0:
            raise UserError(f"huber_c must be > 0, got {self.huber_c}")

    def _validate_optimisation(self) -> None:
        for key in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lr_num_cycles"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("learning_rate", "adam_epsilon", "lr_power"):
            if not getattr(self, key) > 0:
                raise UserError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"{key} must be in [0, 1), got {getattr(self, key)}")
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

    def _validate_run(self) -> None:
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
        for key in ("validation_steps", "validation_num_inference_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.validation_guidance_scale < 0:
            raise UserError(f"validation_guidance_scale must be >= 0, got {self.validation_guidance_scale}")
        if any(not p.strip() for p in self.validation_prompts):
            raise UserError("validation_prompts has an empty prompt")


__all__ = ["LR_SCHEDULERS", "METHODS", "TrainConfig"]
