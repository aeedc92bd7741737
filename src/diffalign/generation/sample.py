"""Sample a pipeline to a folder of PNGs plus `manifest.jsonl` (file, prompt, seed, settings).

Every image has its own seed (`seed + index`), drawn from its own generator, so an image does not depend on
the batch size, on which other prompts share its batch, or on how many processes share the job: the same seed
and settings give the same images.

Several processes (`accelerate launch` / `torchrun`, see `accelerate_processes`): the images still to make are
dealt round-robin (process r of w makes the r-th, (r+w)-th, ... of them). Each process appends the rows of the
images it saved to its own part file `.manifest-part-{r}.jsonl`; at the end the main process merges every row
into ONE `manifest.jsonl`, ordered by index and written atomically, and removes the parts.

Resume: generating again into a folder that already holds images of the same job (same settings, prompts at
the same indices and seed; from `manifest.jsonl` or from the part files a killed run left) makes only the
missing images; the manifest then lists each image once. A folder holding images of other settings is refused
(`UserError`) unless `overwrite=True`, which first removes those images and their manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..fsutil import ensure_writable_dir
from ..processes import join_processes
from .manifest import clear, existing_rows, part_file, read_manifest, write_manifest

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

@dataclass
class GenerationSettings:
    guidance_scale: float = 7.5
    num_inference_steps: int = 20
    seed: int = 0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    batch_size: int = 16
    num_images_per_prompt: int = 1
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None  # FLUX: classifier-free guidance with a negative branch (true CFG)
    extra: dict = field(default_factory=dict)  # recorded in the manifest as given (model, lora, ...)


@dataclass
class GeneratedImage:
    file: str
    prompt: str
    seed: int
    index: int


@dataclass
class Processes:
    """This process's place among the processes sharing one generation job (default: a job of one)."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = lambda: None
    device: str | torch.device = "cpu"

    @property
    def is_main(self) -> bool:
        return self.index == 0


def accelerate_processes() -> Processes:
    """The processes of an `accelerate launch` / `torchrun` job, through accelerate's `PartialState`.

    Every launched process joins (`diffalign.processes`); otherwise each would generate the whole job alone into
    the same folder.
    """
    state = join_processes()
    return Processes(state.process_index, state.num_processes, state.wait_for_everyone, state.device)


def native_size(pipe: DiffusionPipeline) -> int:
    size = getattr(pipe, "default_sample_size", None)  # SD3 / FLUX pipelines: no unet, their own default
    return int((size or pipe.unet.config.sample_size) * pipe.vae_scale_factor)


def _settings_record(pipe: DiffusionPipeline, settings: GenerationSettings, height: int, width: int) -> dict:
    record = {
        "guidance_scale": settings.guidance_scale,
        "num_inference_steps": settings.num_inference_steps,
        "num_images_per_prompt": settings.num_images_per_prompt,  # groups rows by prompt line (`diffalign pairs --from`)
        "height": height,
        "width": width,
        "negative_prompt": settings.negative_prompt,
        "scheduler": type(pipe.scheduler).__name__,
        **({"true_cfg_scale": settings.true_cfg_scale} if settings.true_cfg_scale is not None else {}),
        **settings.extra,
    }
    return json.loads(json.dumps(record))  # the form it has when read back (tuples -> lists)


def _mismatch(row: dict, jobs: list[tuple[str, int]], seed: int, record: dict) -> str | None:
    """Why an existing row does not belong to this job (None if it does)."""
    index = row["index"]
    if index >= len(jobs):
        return f"image {index}, beyond the {len(jobs)} images asked for now"
    if row.get("settings") != record:
        old = row.get("settings") or {}
        key = next((k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)), "settings")
        return f"{key}={old.get(key)!r} where this run has {record.get(key)!r}"
    if row.get("prompt") != jobs[index][0]:
        return f"prompt {row.get('prompt')!r} for image {index} where this run has {jobs[index][0]!r}"
    if row.get("seed") != seed + index:
        return f"seed {row.get('seed')} for image {index} where this run has {seed + index}"
    return None


def _done(out: Path, rows: list[dict], jobs, seed: int, record: dict) -> set[int]:
    """Indices already made for this job; UserError when the folder holds another job's images."""
    for row in rows:
        why = _mismatch(row, jobs, seed, record)
        if why is not None:
            raise UserError(f"'{out}' already holds images of other settings ({why}): choose another --out, or pass "
                            "--overwrite to replace them")
    return {row["index"] for row in rows if (out / str(row.get("file", ""))).is_file()}


def _merge(out: Path, jobs: list[tuple[str, int]]) -> list[dict]:
    """Main process: every row of this job once, ordered by index, into manifest.jsonl; parts removed."""
    by_index = {row["index"]: row for row in existing_rows(out)}
    missing = [i for i in range(len(jobs)) if i not in by_index or not (out / by_index[i]["file"]).is_file()]
    if missing:
        raise RuntimeError(f"generation finished without image(s) {missing[:5]} in {out}")
    rows = [by_index[i] for i in range(len(jobs))]
    write_manifest(out, rows)
    return rows


def generate_to_folder(pipe: DiffusionPipeline, prompts: list[str], out_dir: str | Path, settings: GenerationSettings, *,
                       overwrite: bool = False, processes: Processes | None = None) -> list[GeneratedImage]:
    """Generate `num_images_per_prompt` images per prompt into `out_dir`; returns every row of the manifest.

    Images already in the folder from the same job are kept (resume); `overwrite` replaces another job's.
    With `processes` (see `accelerate_processes`) every process calls this with the same arguments.
    """
    procs = processes or Processes()
    out = ensure_writable_dir(out_dir)
    height = settings.height or native_size(pipe)
    width = settings.width or native_size(pipe)
    jobs = [(p, k) for p in prompts for k in range(settings.num_images_per_prompt)]
    record = _settings_record(pipe, settings, height, width)

    if overwrite and procs.is_main:
        clear(out, existing_rows(out))
    procs.barrier()
    done = _done(out, existing_rows(out), jobs, settings.seed, record)  # every process reads the same
    procs.barrier()  # nobody writes a part file before every process has read the folder
    todo = [i for i in range(len(jobs)) if i not in done]
    mine = todo[procs.index :: procs.count]
    if procs.is_main and done:
        print(f"{len(done)} of {len(jobs)} images already in {out}: making the other {len(todo)}", flush=True)

    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(mine), desc="generate" + (f" (process 0 of {procs.count})" if procs.count > 1 else ""),
               unit="img", disable=not procs.is_main)
    with part_file(out, procs.index).open("a", encoding="utf-8") as part:
        for start in range(0, len(mine), settings.batch_size):
            batch = mine[start : start + settings.batch_size]
            seeds = [settings.seed + index for index in batch]
            kwargs = {}
            if settings.negative_prompt is not None:
                kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
            if settings.true_cfg_scale is not None:  # FLUX runs its negative branch only with a negative prompt
                kwargs["true_cfg_scale"] = settings.true_cfg_scale
                kwargs.setdefault("negative_prompt", [""] * len(batch))
            images = pipe(
                prompt=[jobs[index][0] for index in batch],
                height=height,
                width=width,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
                **kwargs,
            ).images
            for index, seed, image in zip(batch, seeds, images):
                name = f"{index:05d}.png"
                image.save(out / name)  # the row follows the image: a listed image is a whole file
                row = GeneratedImage(file=name, prompt=jobs[index][0], seed=seed, index=index)
                part.write(json.dumps({**asdict(row), "settings": record}) + "\n")
            part.flush()
            bar.update(len(batch))
    bar.close()
    procs.barrier()
    if procs.is_main:
        _merge(out, jobs)
    procs.barrier()
    return [GeneratedImage(r["file"], r["prompt"], r["seed"], r["index"]) for r in read_manifest(out)]
