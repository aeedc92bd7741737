"""``PairsConfig``: every setting of ``diffalign pairs``, one dataclass for the CLI, YAML and Python.

Load with :func:`diffalign.config_loader.load_config` (``configs/pairs/*.yaml`` are ready recipes), then
:meth:`PairsConfig.validate` runs before anything is read or loaded. The recipes and the output layout are
described in ``generation/pairs/run.py`` and ``docs/pairs.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ...config_loader import check_types, config_to_dict
from ...data.prompts import read_prompts
from ...errors import UserError
from .filter import parse_conditions

PROMPT_FIELD = "{prompt}"
TOY_PROMPT_SETS = ("toy:train", "toy:heldout")
# Keys that change how a run goes but not one byte of its data: a re-run may change them and still resume.
RUN_ONLY_KEYS = ("output_dir", "overwrite", "batch_size", "keep_images", "images_dir")
# Keys added after datasets had been made with this tool: left out of the fingerprint while at their default,
# so a folder made before they existed is still the same config (its shards are not written again).
ADDED_KEYS = {"filter_reward": None, "filter_chosen": (), "filter_rejected": (), "max_tries": 1, "image_root": None}


def _f(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PairsConfig:
    """Settings of one `diffalign pairs` run. recipe, model and output_dir have no default: give them."""

    # --- what to make ------------------------------------------------------------------------------------
    recipe: Optional[Literal["prefix", "ranked", "target"]] = _f(
        None, "How pairs are made (required). prefix (MaPO Pick-Style / Pick-Safety): per context prompt, the "
        "chosen image is sampled from chosen_template, the rejected one from rejected_template, same seed; "
        "ranked (AI feedback): num_samples_per_prompt samples per prompt, scored by reward, best against "
        "worst when the gap exceeds margin; target (MaPO 'any fine-tuning set becomes pairs'): chosen = a "
        "real image of image_caption_source, rejected = the model's sample for its caption.")
    pretrained_model_name_or_path: Optional[str] = _f(
        None, "Pipeline to sample (required): a hub id, a local diffusers folder, or 'toy' for the shipped toy model.")
    pretrained_vae_model_name_or_path: Optional[str] = _f(None, "A separate VAE (hub id or folder); none: the pipeline's own.")
    lora: Optional[str] = _f(None, "A LoRA folder or .safetensors file loaded into the pipeline before sampling.")
    dtype: Literal["float32", "float16", "bfloat16"] = _f("float32", "Weights dtype for sampling (float16 on GPUs).")

    # --- prompts (prefix, ranked) --------------------------------------------------------------------------
    prompts: Optional[str] = _f(
        None, "Prompt source: a text file (one prompt a line), JSONL with a 'prompt' field, a dataset column "
        "hf:SOURCE:SPLIT:COLUMN, or toy:train / toy:heldout (the toy world's prompt sets). Or use prompt_list.")
    prompt_list: tuple[str, ...] = _f(
        (), "The prompts themselves, as a YAML list (or comma-separated on the command line). Give prompts or "
        "prompt_list, not both.")
    pairs_per_prompt: int = _f(
        1, "prefix: pairs per prompt (each its own seed); ranked: groups of candidates per prompt. Unit i "
        "(a pair slot, or a group) uses prompt i mod len(prompts), so the prompts take turns.")
    num_pairs: Optional[int] = _f(
        None, "Number of units in all (prefix: pairs, ranked: groups, target: source rows); none: "
        "len(prompts) x pairs_per_prompt (target: every usable row). Overrides pairs_per_prompt.")

    # --- sampling ------------------------------------------------------------------------------------------
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale.")
    num_inference_steps: int = _f(20, "Sampling steps (the pipeline's own scheduler; DDIM for the toy model).")
    height: Optional[int] = _f(None, "Image height in pixels; none: the model's native size. Give both or neither.")
    width: Optional[int] = _f(None, "Image width in pixels; none: the model's native size.")
    negative_prompt: Optional[str] = _f(None, "Negative prompt for every sample.")
    seed: int = _f(
        0, "Base seed. prefix: both images of pair i get seed + i (see same_seed); ranked: candidate j of group "
        "g gets seed + g x num_samples_per_prompt + j; target: row i's sample gets seed + i. Also seeds the "
        "per-pair draw of which image is jpg_0.")
    batch_size: int = _f(16, "Images per pipeline call. Images do not depend on it: a re-run may change it.")

    # --- recipe prefix -------------------------------------------------------------------------------------
    chosen_template: Optional[str] = _f(
        None, "prefix (required): the prompt of the chosen image, with {prompt} for the context prompt, e.g. "
        "'{prompt}, striped' (a suffix) or 'a watercolor of {prompt}' (a prefix).")
    rejected_template: Optional[str] = _f(
        None, "prefix (required): the prompt of the rejected image, e.g. '{prompt}' (Pick-Style) or "
        "'{prompt}, outlined' (Pick-Safety: the rejected image carries the attribute to avoid).")
    same_seed: bool = _f(
        True, "prefix: both images of a pair share one seed, so they differ mainly in what the templates "
        "change; false: the rejected image of pair i gets seed + 1000000 + i.")

    # --- recipe ranked -------------------------------------------------------------------------------------
    num_samples_per_prompt: int = _f(4, "ranked: candidates per group (at least 2), ranked by the reward.")
    strategy: Literal["best-worst", "all"] = _f(
        "best-worst", "ranked: best-worst = the top candidate of a group against the bottom one (one pair); "
        "all = every two candidates whose gap exceeds margin.")

    # --- reward (ranked: required; prefix, target: an optional check) -----------------------------------
    reward: Optional[str] = _f(
        None, "Reward spec NAME[=PATH][:KEY=VALUE], e.g. toy or toy:term=shape_colour_correct. ranked: ranks "
        "the candidates (required). prefix / target: optional; a pair is kept only if the reward prefers the "
        "chosen image by more than margin (prefix scores both against the chosen prompt, target against the "
        "caption).")
    score_key: str = _f("score", "The reward term to rank by: score, or a named term of the reward's details "
                        "(toy: e.g. shape_colour_correct, style_striped).")
    margin: float = _f(
        0.0, "A pair is written only if the chosen image's score exceeds the rejected one's by more than "
        "this; others are counted in summary.json (gap_below_margin, reversed). Equal scores never make a pair.")

    # --- filter and further tries (prefix, target) -------------------------------------------------------
    filter_reward: Optional[str] = _f(
        None, "prefix / target: a reward (any spec get_reward takes, e.g. toy) for an absolute check of each "
        "image: a pair is kept only if its chosen image meets every filter_chosen condition and its rejected "
        "image every filter_rejected condition. Counted in summary.json (chosen_failed, rejected_failed).")
    filter_chosen: tuple[str, ...] = _f(
        (), "Conditions 'TERM OP NUMBER' (OP: >=, >, <=, <) on the chosen image, scored by filter_reward "
        "against the prompt it was sampled from (target: the caption). TERM is score or a term of the "
        "reward's details, e.g. [all_correct >= 1] (toy: every attribute the prompt names is drawn). A NaN "
        "value (a term the prompt does not ask about) meets no condition.")
    filter_rejected: tuple[str, ...] = _f(
        (), "Conditions on the rejected image, scored against the context prompt (prefix; target: the "
        "caption), e.g. [all_correct >= 1, style_striped < 0.5]: right content, without the chosen style.")
    max_tries: int = _f(
        1, "prefix / target: tries per unit. A unit whose pair fails a check (filter, or reward / margin) "
        "samples its images again with seed + t x 10000000 (try t = 1, 2, ...) until a pair passes or the "
        "tries run out; units that never pass are counted. A real image (target) is the same in every try, "
        "so a unit whose real image fails filter_chosen is not tried again.")

    # --- recipe target -------------------------------------------------------------------------------------
    image_caption_source: Optional[str] = _f(
        None, "target (required): the real images. A folder of images with captions.jsonl "
        "({\"file_name\": ..., \"caption\": ...} a line), or parquet file(s) / glob, a save_to_disk folder or a "
        "hub dataset with an image and a caption column.")
    image_column: str = _f("image", "target: image column of a table source (encoded bytes or paths).")
    image_root: Optional[str] = _f(
        None, "target: the folder image paths in a table source are read from (relative to it); paths outside it, "
        "or paths with no image_root, are refused. Image bytes need none.")
    caption_column: str = _f("caption", "target: caption column (a table) or key (captions.jsonl).")
    source_split: str = _f("train", "target: split of a hub or save_to_disk source.")
    strict_data: bool = _f(
        False, "target: true stops at the first unusable row (missing or undecodable image, missing caption) "
        "naming its row and reason; false skips such rows and counts them per reason in summary.json.")

    # --- output --------------------------------------------------------------------------------------------
    output_dir: Optional[str] = _f(
        None, "Output folder (required): data/train-NNNNN.parquet, pairs_config.yaml, summary.json and the "
        "candidate images (images/). Pass the folder as dataset_name to `diffalign train`.")
    shard_size: int = _f(64, "Units per parquet shard; an interrupted run resumes after the last whole shard.")
    image_format: Literal["png", "jpeg"] = _f(
        "png", "Encoding of jpg_0 / jpg_1: png (lossless; the sampled files as they are) or jpeg (quality 95, "
        "smaller).")
    chosen_first: bool = _f(
        False, "true: the chosen image is always jpg_0; false: a per-pair draw (seeded by seed and pair_index) "
        "decides, so position does not leak the label.")
    images_dir: Optional[str] = _f(
        None, "Where candidate images are sampled (generate folders with manifest.jsonl); none: "
        "output_dir/images. Point it at another run's images to label them again without sampling: images "
        "of the same prompts, seeds and settings are reused, only missing ones are made.")
    keep_images: bool = _f(True, "false: delete output_dir/images once the data is complete (resume needs them until then).")
    overwrite: bool = _f(
        False, "An output_dir made with another config is refused; true deletes its data, summary and candidate "
        "images and starts again.")

    # ------------------------------------------------------------------------------------------- checks
    def validate(self) -> "PairsConfig":
        """Raise :class:`UserError` naming the key for a missing or impossible setting; return self.

        Offline and cheap: nothing is read or loaded (prompt files, sources and rewards are checked next,
        still before the model, by `run_pairs`)."""
        check_types(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name} must be a finite number, got {value}")
        for key, what in (("recipe", "prefix|ranked|target"), ("pretrained_model_name_or_path", "HUB_ID_OR_FOLDER (or toy)"),
                          ("output_dir", "FOLDER")):
            if getattr(self, key) in (None, ""):
                raise UserError(f"{key} is not set: pass --{key}={what} or set it in the YAML file")
        self._validate_numbers()
        self._validate_recipe_keys()
        return self

    def _validate_numbers(self) -> None:
        for key in ("num_inference_steps", "batch_size", "shard_size", "pairs_per_prompt"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.num_pairs is not None and self.num_pairs < 1:
            raise UserError(f"num_pairs must be at least 1 (or none), got {self.num_pairs}")
        if self.seed < 0:
            raise UserError(f"seed must be at least 0, got {self.seed}")
        if self.margin < 0:
            raise UserError(f"margin must be at least 0, got {self.margin}")
        if self.guidance_scale < 0:
            raise UserError(f"guidance_scale must be at least 0, got {self.guidance_scale}")
        if (self.height is None) != (self.width is None):
            raise UserError("give both height and width, or neither (the model's native size)")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise UserError(f"{key} must be a positive multiple of 8, got {value}")
        if self.max_tries < 1:
            raise UserError(f"max_tries must be at least 1, got {self.max_tries}")
        if not self.keep_images and self.images_dir is not None:
            raise UserError("keep_images: false deletes the candidate images, so it only applies to the default "
                            "output_dir/images; unset images_dir or keep the images")

    def _validate_recipe_keys(self) -> None:
        recipe = self.recipe
        if recipe != "prefix":
            for key in ("chosen_template", "rejected_template"):
                if getattr(self, key) is not None:
                    raise UserError(f"{key} applies to recipe prefix only (this is recipe {recipe}); remove it")
        if recipe == "target":
            if self.prompts is not None or self.prompt_list:
                raise UserError("recipe target takes its prompts from the captions of image_caption_source; "
                                "remove prompts / prompt_list")
            if not self.image_caption_source:
                raise UserError("recipe target needs image_caption_source: a folder with captions.jsonl, parquet, "
                                "or a dataset with image and caption columns")
        else:
            if self.image_caption_source is not None:
                raise UserError(f"image_caption_source applies to recipe target only (this is recipe {recipe})")
            if (self.prompts is None) == (not self.prompt_list):
                raise UserError(f"recipe {recipe} needs prompts: set prompts (a file, hf:..., toy:train or "
                                "toy:heldout) or prompt_list (the prompts themselves), exactly one of them")
            if self.prompts is not None and self.prompts.startswith("toy:") and self.prompts not in TOY_PROMPT_SETS:
                raise UserError(f"prompts {self.prompts!r} is not a toy prompt set: use {' or '.join(TOY_PROMPT_SETS)}")
        if recipe == "prefix":
            self._validate_templates()
        self._validate_filter()
        if recipe == "ranked":
            if not self.reward:
                raise UserError("recipe ranked needs a reward to rank candidates: set reward (e.g. toy)")
            if self.num_samples_per_prompt < 2:
                raise UserError(f"num_samples_per_prompt must be at least 2 to rank a group's candidates, "
                                f"got {self.num_samples_per_prompt}")

    def _validate_filter(self) -> None:
        if self.recipe == "ranked":
            for key in ("filter_reward", "filter_chosen", "filter_rejected"):
                if getattr(self, key):
                    raise UserError(f"{key} applies to recipes prefix and target (recipe ranked ranks its candidates "
                                    "by reward already: use score_key and margin); remove it")
            if self.max_tries != 1:
                raise UserError("max_tries applies to recipes prefix and target (recipe ranked: raise "
                                "num_samples_per_prompt for more candidates); remove it")
            return
        conditions = [*parse_conditions(self.filter_chosen, "filter_chosen"),
                      *parse_conditions(self.filter_rejected, "filter_rejected")]
        if self.filter_reward and not conditions:
            raise UserError("filter_reward is set but there is nothing to check: give filter_chosen and/or "
                            "filter_rejected, e.g. filter_chosen: ['all_correct >= 1']")
        if conditions and not self.filter_reward:
            raise UserError("filter_chosen / filter_rejected need filter_reward, the reward that scores them "
                            "(e.g. filter_reward: toy)")
        if self.max_tries > 1 and not (self.filter_reward or self.reward):
            raise UserError(f"max_tries {self.max_tries} samples further seeds for units whose pair fails a check, "
                            "but there is no check: set filter_reward (or reward), or max_tries: 1")

    def _validate_templates(self) -> None:
        for key in ("chosen_template", "rejected_template"):
            template = getattr(self, key)
            if template is None:
                raise UserError(f"recipe prefix needs {key}, e.g. '{PROMPT_FIELD}, striped' or '{PROMPT_FIELD}'")
            if PROMPT_FIELD not in template:
                raise UserError(f"{key} {template!r} has no {PROMPT_FIELD}: the context prompt would be lost")
            rest = template.replace(PROMPT_FIELD, "")
            if "{" in rest or "}" in rest:
                raise UserError(f"{key} {template!r} has a brace other than {PROMPT_FIELD}, the only field")
        if self.chosen_template == self.rejected_template:
            raise UserError(f"chosen_template and rejected_template are the same ({self.chosen_template!r}): "
                            "the images of a pair would differ only by chance")

    # --------------------------------------------------------------------------------------- identity
    def data_settings(self) -> dict:
        """Every key that decides the data (all but RUN_ONLY_KEYS), as plain data."""
        return {k: v for k, v in config_to_dict(self).items() if k not in RUN_ONLY_KEYS}

    @property
    def checks_pairs(self) -> bool:
        """Whether units go through the filter / further tries (and the summary reports their counts)."""
        return bool(self.filter_reward) or self.max_tries > 1

    def fingerprint(self) -> str:
        """A hash of `data_settings`, leaving out ADDED_KEYS at their defaults (shards made before they existed)."""
        unset = [k for k, default in ADDED_KEYS.items() if getattr(self, k) == default]
        settings = {k: v for k, v in self.data_settings().items() if k not in unset}
        blob = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def apply_template(template: str, prompt: str) -> str:
    return template.replace(PROMPT_FIELD, prompt)


def resolve_prompts(cfg: PairsConfig) -> list[str]:
    """The prompt list of a prefix / ranked config (reads the prompt file); UserError when it is empty."""
    if cfg.prompt_list:
        prompts, shown = list(cfg.prompt_list), "prompt_list"
    else:
        prompts, shown = read_prompts(cfg.prompts), f"prompts {cfg.prompts!r}"
    if not prompts:
        raise UserError(f"{shown} holds no prompts")
    return prompts


def changed_keys(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


__all__ = ["PairsConfig", "apply_template", "changed_keys", "resolve_prompts"]
