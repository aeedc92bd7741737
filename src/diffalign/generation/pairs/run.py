"""Self-generated preference datasets (`diffalign pairs`): a model's own samples made into Pick-a-Pic pairs.

Recipes (`PairsConfig.recipe`; `recipes.py`): **prefix** (MaPO's Pick-Style / Pick-Safety: chosen and
rejected sampled from two prompt templates with one seed), **ranked** (AI feedback: candidates ranked by a
reward, best against worst when the gap exceeds a margin) and **target** (MaPO's "any fine-tuning set becomes
pairs": a real image of an image-caption set against the model's sample of its caption).

Columns: caption, jpg_0, jpg_1 (encoded images), label_0, label_1 (1.0 / 0.0), recipe, model, lora, prompt_0,
prompt_1 (the prompt each image was sampled from; null for a real image), seed_0, seed_1 (null for a real
image), settings (JSON: guidance, steps, scheduler, size, reward ...), score_0, score_1 (null when no reward
was used), pair_index (unit x slots per unit + slot: the same pair has the same index in every run of a
config). Which image is jpg_0 is a per-pair draw from (seed, pair_index), unless `chosen_first`.

Filter and further tries (prefix, target; `filter.py`, `tries.py`): `filter_reward` with
`filter_chosen` / `filter_rejected` keeps a pair only if each image passes an absolute check, and `max_tries`
gives a unit whose pair fails a check (filter or reward margin) further seeds, shard by shard, until one passes.
The summary counts the kept share, the unit's reasons and the tries used.

Resume and determinism: unit i is sampled with seeds fixed by i alone (`generate_to_folder` gives every image
its own generator), images already in the images folder are never sampled again, shards are written under a
temporary name and renamed, and a shard written by the same config (fingerprint in its footer) is skipped.
Rewards score each shard in fixed chunks. So an interrupted run re-run with the same config writes the bytes
one uninterrupted run writes, and the same config and seed give the same data. Folder layout and the config
check: `store.py`.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ...errors import UserError
from ...fsutil import atomic_write_text
from ...models import load_lora_into_pipeline, load_pipeline
from ...rewards import get_reward
from ..manifest import read_manifest
from ..sample import GenerationSettings, Processes, generate_to_folder
from .config import PairsConfig
from .filter import Outcome, PairFilter, judge_try
from .recipes import Recipe, Unit, build_recipe, pick_pairs
from .store import (
    DATA_DIR,
    PairsResult,
    complete_shards,
    images_root,
    prepare_output,
    read_pairs,
    schema,
    write_shard,
    write_summary,
)
from .tries import sample_units

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

SCORE_CHUNK = 32  # images per reward call; fixed, so scores never depend on how a run was split
JPEG_QUALITY = 95
PENDING_FILE = ".tries-pending.tmp"  # several processes: the units to try again, as the main process decided


# ------------------------------------------------------------------------------------------------ sampling
def load_sampler(cfg: PairsConfig, device="cpu"):
    """The pipeline a config samples ('toy' is the shipped toy model), with its LoRA loaded."""
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
    pipe = load_pipeline(cfg.pretrained_model_name_or_path, vae_path=cfg.pretrained_vae_model_name_or_path,
                         dtype=dtype, device=device)
    if cfg.lora:
        load_lora_into_pipeline(pipe, cfg.lora)
    return pipe


def generation_settings(cfg: PairsConfig, seed: int = 0, per_prompt: int = 1) -> GenerationSettings:
    return GenerationSettings(
        guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps, seed=seed, height=cfg.height,
        width=cfg.width, batch_size=cfg.batch_size, num_images_per_prompt=per_prompt, negative_prompt=cfg.negative_prompt,
        extra={"model": cfg.pretrained_model_name_or_path, "lora": cfg.lora, "vae": cfg.pretrained_vae_model_name_or_path},
    )


def sample(cfg: PairsConfig, recipe: Recipe, pipe: DiffusionPipeline, processes: Processes) -> tuple[dict, dict]:
    """Sample the recipe's jobs (only the images not already there): {folder: {index: image}} and the settings."""
    images, record = {}, {}
    for job in recipe.jobs():
        settings = generation_settings(cfg, job.seed, job.per_prompt)
        folder = images_root(cfg) / job.folder
        try:
            rows = generate_to_folder(pipe, job.prompts, folder, settings, processes=processes)
        except UserError:
            if not cfg.overwrite:  # the folder holds images of other settings: refused without overwrite
                raise
            print(f"overwrite: replacing the candidate images of other settings in {folder}", flush=True)
            rows = generate_to_folder(pipe, job.prompts, folder, settings, overwrite=True, processes=processes)
        images[job.folder] = {row.index: row for row in rows}
        record = read_manifest(folder)[0]["settings"]  # the same for every job: seeds are not part of it
    return images, record


# ---------------------------------------------------------------------------------------------- images
class _Images:
    """A side's image: decoded (for the reward) or encoded in image_format (for the table)."""

    def __init__(self, recipe: Recipe, fmt: str):
        self.source, self.fmt = recipe.source, fmt

    def pil(self, side):
        from PIL import Image

        if side.source_row is not None:
            return self.source.image(side.source_row)
        with Image.open(side.file) as image:
            return image.convert("RGB")

    def encoded(self, side) -> bytes:
        if side.file is not None and self.fmt == "png" and side.file.suffix.lower() == ".png":
            return side.file.read_bytes()  # the sampled PNG itself, not a re-encoding
        buffer = io.BytesIO()
        if self.fmt == "jpeg":
            self.pil(side).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        else:
            self.pil(side).save(buffer, format="PNG")
        return buffer.getvalue()


def check_score_key(reward, key: str) -> None:
    """Fail before any sampling if `key` is not a term of the reward (one call on a blank image)."""
    if key == "score":
        return
    from PIL import Image

    terms = reward.details([Image.new("RGB", (64, 64), (200, 200, 200))], [""])
    if key not in terms:
        raise UserError(f"score_key '{key}' is not a term of reward '{reward.name}'; its terms are: {', '.join(sorted(terms))}")


def score_units(reward, score_key: str, units: list[Unit], images: _Images) -> list[list[float]]:
    """Per unit, one score per side against its score prompt (NaN where the reward's term is undefined)."""
    flat = [(side, prompt) for unit in units for side, prompt in zip(unit.sides, unit.score_prompts)]
    values: list[float] = []
    for start in range(0, len(flat), SCORE_CHUNK):
        chunk = flat[start : start + SCORE_CHUNK]
        pil, prompts = [images.pil(s) for s, _ in chunk], [p for _, p in chunk]
        # `score` is the reward's own score (for a term reward, its term); other keys name a term of `details`.
        out = reward.score(pil, prompts) if score_key == "score" else reward.details(pil, prompts)[score_key]
        values.extend(float(v) for v in out.detach().double().cpu().tolist())
    it = iter(values)
    return [[next(it) for _ in unit.sides] for unit in units]


# ------------------------------------------------------------------------------------------------ rows
def _chosen_first(cfg: PairsConfig, pair_index: int) -> bool:
    # Its own stream per pair: the draw depends on (seed, pair_index) only, not on which pairs were kept.
    return cfg.chosen_first or bool(np.random.default_rng([cfg.seed, pair_index]).integers(2))


def _score(scores, k: int):
    return None if scores is None or math.isnan(scores[k]) else float(scores[k])


def shard_rows(cfg: PairsConfig, recipe: Recipe, outcomes: list[Outcome], images: _Images, settings_json: str,
               info: dict, bar=None):
    """Yield the rows of these units' pairs; fills `info` with the counts (pairs, skipped by reason, score sums;
    with a filter or further tries also `tries`: tries sampled, kept pairs by the try that made them, failed
    tries by reason, and `extra_images`, the images sampled for tries after the first)."""
    skipped: Counter = Counter()
    info.update(units=[outcomes[0].unit.index, outcomes[-1].unit.index + 1], pairs=0, scored_pairs=0,
                chosen_score_sum=0.0, rejected_score_sum=0.0)
    kept_on: Counter = Counter()
    failed: Counter = Counter()
    for outcome in outcomes:
        unit, unit_scores, kept = outcome.unit, outcome.scores, outcome.kept
        skipped.update(outcome.skipped)
        failed.update(outcome.failed_tries or {})
        if kept:
            kept_on[str(outcome.tries)] += 1
        for slot, w, l in kept:
            pair_index = unit.index * recipe.slots_per_unit + slot
            first = _chosen_first(cfg, pair_index)
            a, b = (w, l) if first else (l, w)
            sa, sb = unit.sides[a], unit.sides[b]
            yield {
                "caption": unit.caption, "jpg_0": images.encoded(sa), "jpg_1": images.encoded(sb),
                "label_0": float(first), "label_1": float(not first), "recipe": cfg.recipe,
                "model": cfg.pretrained_model_name_or_path, "lora": cfg.lora, "prompt_0": sa.prompt, "prompt_1": sb.prompt,
                "seed_0": sa.seed, "seed_1": sb.seed, "settings": settings_json, "score_0": _score(unit_scores, a),
                "score_1": _score(unit_scores, b), "pair_index": pair_index,
            }
            info["pairs"] += 1
            if unit_scores is not None:
                info["scored_pairs"] += 1
                info["chosen_score_sum"] += unit_scores[w]
                info["rejected_score_sum"] += unit_scores[l]
        if bar is not None:
            bar.update(1)
    info["skipped"] = dict(sorted(skipped.items()))
    if cfg.checks_pairs:
        sampled = sum(o.tries for o in outcomes)
        info["tries"] = {"sampled": sampled, "kept_on_try": dict(sorted(kept_on.items(), key=lambda kv: int(kv[0]))),
                         "failed": dict(sorted(failed.items()))}
        info["extra_images"] = (sampled - len(outcomes)) * len(recipe.cached_jobs())


def _settings_json(cfg: PairsConfig, record: dict) -> str:
    settings = {k: v for k, v in record.items() if k not in ("model", "lora")}  # those have their own columns
    if cfg.reward:
        settings.update(reward=cfg.reward, score_key=cfg.score_key, margin=cfg.margin)
    if cfg.filter_reward:
        settings.update(filter_reward=cfg.filter_reward, filter_chosen=list(cfg.filter_chosen),
                        filter_rejected=list(cfg.filter_rejected))
    if cfg.max_tries > 1:
        settings["max_tries"] = cfg.max_tries
    if cfg.recipe == "ranked":
        settings["strategy"] = cfg.strategy
    return json.dumps(settings, sort_keys=True)


# ------------------------------------------------------------------------------------------------- run
def run_pairs(cfg: PairsConfig, *, pipe: DiffusionPipeline | None = None, reward=None, filter_reward=None,
              processes: Processes | None = None) -> PairsResult:
    """Make (or finish) the dataset `cfg` describes; see the module docstring.

    Everything that can be wrong with the config, the prompts, the source, the rewards or the output folder
    fails before the model loads. `pipe` / `reward` / `filter_reward` are used instead of loading them (the
    filter reuses `reward` when both specs are the same). With `processes` (`accelerate launch`), every process
    samples its share and the main one scores, decides and writes the data.
    """
    cfg.validate()
    procs = processes or Processes()
    recipe = build_recipe(cfg)
    if reward is None and cfg.reward:
        reward = get_reward(cfg.reward)
    if reward is not None:
        check_score_key(reward, cfg.score_key)
    pair_filter = None
    if cfg.filter_reward:
        if filter_reward is None and reward is not None and cfg.filter_reward == cfg.reward:
            filter_reward = reward
        if filter_reward is None:
            filter_reward = get_reward(cfg.filter_reward)
        pair_filter = PairFilter.from_config(cfg, filter_reward)
        pair_filter.check_terms()
    if procs.is_main:
        prepare_output(cfg)
    procs.barrier()
    starts = range(0, recipe.num_units, cfg.shard_size)
    bounds = [(s, a, min(a + cfg.shard_size, recipe.num_units)) for s, a in enumerate(starts)]
    done = complete_shards(cfg, bounds)
    todo = [(s, a, b) for s, a, b in bounds if s not in done]
    if todo:
        pipe = pipe if pipe is not None else load_sampler(cfg, procs.device)
        images, record = sample(cfg, recipe, pipe, procs)
        _write_shards(cfg, recipe, (reward, pair_filter), todo, images, record, reused=len(done), pipe=pipe, procs=procs)
    if not procs.is_main:
        return PairsResult(Path(cfg.output_dir), str(cfg.output_dir), recipe.num_units, 0, len(bounds))
    done = complete_shards(cfg, bounds)
    candidates = sum(len(job.prompts) * job.per_prompt for job in recipe.jobs())
    source_skipped = recipe.source.counts if recipe.source is not None else Counter()
    result = write_summary(cfg, [done[s] for s, _, _ in bounds], units=recipe.num_units, candidates=candidates,
                           source_skipped=source_skipped, reused=len(bounds) - len(todo), slots=recipe.slots_per_unit)
    if not cfg.keep_images:
        import shutil

        shutil.rmtree(images_root(cfg), ignore_errors=True)
    return result


def _write_shards(cfg, recipe, checks, todo, images, record, reused: int, pipe: DiffusionPipeline, procs: Processes) -> None:
    """Every process: shard by shard, the units' outcomes (further tries are sampled by all processes); the main
    process writes each shard."""
    reader, settings_json = _Images(recipe, cfg.image_format), _settings_json(cfg, record)
    if reused and procs.is_main:
        print(f"{reused} shard(s) already in {Path(cfg.output_dir) / DATA_DIR}: writing the other {len(todo)}", flush=True)
    with tqdm(total=sum(b - a for _, a, b in todo), desc=f"pairs ({cfg.recipe})", unit="unit",
              disable=not procs.is_main) as bar:
        for s, a, b in todo:
            outcomes = _outcomes(cfg, recipe, checks, range(a, b), images, reader, pipe, procs)
            if procs.is_main:
                info: dict = {}
                write_shard(cfg, s, shard_rows(cfg, recipe, outcomes, reader, settings_json, info, bar), info)
    if procs.is_main:
        (Path(cfg.output_dir) / DATA_DIR / PENDING_FILE).unlink(missing_ok=True)


def _outcomes(cfg, recipe, checks, unit_range, images, reader, pipe: DiffusionPipeline, procs: Processes) -> list[Outcome] | None:
    """What becomes of units a..b-1 (None in processes other than the main one).

    Without filter or further tries: one try, the reward (if any) scores every unit and `recipe.decide` keeps
    or skips its pairs. With them (`cfg.checks_pairs`), try t = 0, 1, ... checks the units still pending: the
    filter first, then the reward check of the pairs the filter passed; a unit is settled by its first passing
    try, and the others sample try t + 1 (not a unit whose real image failed: it would fail again) until
    max_tries. All of it is a function of the units' images, so of the config and the unit range alone.
    """
    reward, pair_filter = checks
    root = images_root(cfg)
    if not cfg.checks_pairs:
        if not procs.is_main:
            return None
        units = [recipe.unit(i, images, root) for i in unit_range]
        scores = score_units(reward, cfg.score_key, units, reader) if reward is not None else [None] * len(units)
        return [Outcome(unit, sc, *recipe.decide(sc)) for unit, sc in zip(units, scores)]
    pending, settled = list(unit_range), {}
    failed = {i: Counter() for i in unit_range}
    for attempt in range(cfg.max_tries):
        if attempt:
            pending = _share(cfg, procs, pending)
            if not pending:
                break
            for folder, items in recipe.retry_items(attempt).items():
                made = sample_units(pipe, root / folder, pending, items, generation_settings(cfg), overwrite=cfg.overwrite,
                                    processes=procs)
                images.setdefault(folder, {}).update(made)
        if not procs.is_main:
            continue
        units = [recipe.unit(i, images, root, attempt) for i in pending]
        ok = pair_filter.passes(units, reader, SCORE_CHUNK) if pair_filter is not None else [(True, True)] * len(units)
        passed = [unit for unit, (c, r) in zip(units, ok) if c and r]
        scored = {}
        if reward is not None:  # only the pairs the filter passed are scored
            scored = dict(zip((unit.index for unit in passed), score_units(reward, cfg.score_key, passed, reader)))
        pending = []
        for unit, (chosen_ok, rejected_ok) in zip(units, ok):
            scores = scored.get(unit.index)
            kept, why = judge_try(chosen_ok, rejected_ok, scores, cfg.margin)
            failed[unit.index].update(why)
            skipped = Counter() if kept else Counter({why[0]: 1})
            settled[unit.index] = Outcome(unit, scores, kept, skipped, attempt + 1, failed[unit.index])
            if not kept and (chosen_ok or recipe.chosen_resampled):
                pending.append(unit.index)
    if not procs.is_main:
        return None
    return [settled[i] for i in unit_range]


def _share(cfg, procs: Processes, pending: list[int]) -> list[int]:
    """The main process's list of units to try again, in every process (through a file when there are several)."""
    if procs.count == 1:
        return pending

    path = Path(cfg.output_dir) / DATA_DIR / PENDING_FILE
    if procs.is_main:
        atomic_write_text(path, json.dumps(pending))
    procs.barrier()
    shared = json.loads(path.read_text())
    procs.barrier()  # every process has read it before the main one writes the next
    return shared


# ------------------------------------------------------------------------------------------ one file
def make_pairs(pipe: DiffusionPipeline, prompts: list[str], out: str | os.PathLike, settings: GenerationSettings, *,
               templates: tuple[str, str] | None = None, reward=None, images_dir: str | os.PathLike | None = None,
               overwrite: bool = False, strategy: str = "best-worst", margin: float = 0.0,
               score_key: str = "score") -> PairsResult:
    """One parquet file `out` from a loaded pipeline (the form `diffalign demo` uses); a layer over `run_pairs`.

    With `templates` (chosen, rejected): recipe prefix, `settings.num_images_per_prompt` pairs per prompt; else
    recipe ranked with `reward`, that many candidates per prompt. The run folder is `out` without its suffix
    (resumable like any run); its shards are joined into `out`, written atomically.
    """
    import pyarrow.parquet as pq

    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise UserError(f"'{out}' must name a .parquet file; for a folder of shards use run_pairs / `diffalign pairs`")
    n = settings.num_images_per_prompt
    recipe_keys = ({"recipe": "prefix", "chosen_template": templates[0], "rejected_template": templates[1],
                    "pairs_per_prompt": n} if templates else {"recipe": "ranked", "num_samples_per_prompt": n})
    cfg = PairsConfig(
        **recipe_keys, pretrained_model_name_or_path=str(settings.extra.get("model") or "pipeline"),
        lora=settings.extra.get("lora"), prompt_list=tuple(prompts), guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.num_inference_steps, height=settings.height, width=settings.width,
        negative_prompt=settings.negative_prompt, seed=settings.seed, batch_size=settings.batch_size,
        reward=None if reward is None else getattr(reward, "spec", reward.name), strategy=strategy, margin=margin,
        score_key=score_key, output_dir=str(out.with_suffix("")), images_dir=None if images_dir is None else str(images_dir),
        overwrite=overwrite, shard_size=10**9,
    )
    result = run_pairs(cfg, pipe=pipe, reward=reward)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(read_pairs(cfg.output_dir), tmp)
    os.replace(tmp, out)
    return result


__all__ = ["PairsResult", "check_score_key", "load_sampler", "make_pairs", "pick_pairs", "read_pairs", "run_pairs",
           "schema", "score_units"]
