"""The images of further tries (`max_tries` > 1): one folder per job and try, holding only the units that needed it.

Try t >= 1 of job `chosen` is the folder `chosen_try<t>` (`units.try_folder`); unit i's image there
is `{i:05d}.png`, sampled from the job's prompt of unit i with seed `RetryItems(i)` (the job's seed
+ t x 10000000 + i, see `recipes.py`) by its own generator, as in `generate_to_folder`, so it does not
depend on which other units were tried with it. `manifest.jsonl` has the rows `generate_to_folder` writes
(file, prompt, seed, settings), with `index` the unit. A try folder is asked for a few units at a time (those
of one shard that failed the try before), so unlike a `generate_to_folder` job it need not hold every unit:
images of units not asked for now are kept as long as their prompt, seed and settings are this run's.

Resume and processes work as in `generate_to_folder`: images already there are not sampled again; a folder
holding images of other settings is refused, or cleared with `overwrite`; with several processes the images
still to make are dealt round-robin, each process appends to its own part file, and the main process merges
them into one `manifest.jsonl` (ordered by unit, written atomically).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import UserError
from ...fsutil import ensure_writable_dir
from ..manifest import clear, existing_rows, part_file, write_manifest
from ..sample import GeneratedImage, GenerationSettings, Processes, _settings_record, native_size
from .recipes import RetryItems

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def _mismatch(row: dict, items: RetryItems, record: dict) -> str | None:
    """Why an existing row is not this run's image of its unit (None if it is)."""
    expected = items(row["index"])
    if expected is None:
        return f"image of unit {row['index']}, beyond the {len(items.prompts)} units of this run"
    if row.get("settings") != record:
        old = row.get("settings") or {}
        key = next((k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)), "settings")
        return f"{key}={old.get(key)!r} where this run has {record.get(key)!r}"
    if (row.get("prompt"), row.get("seed")) != expected:
        return (f"prompt {row.get('prompt')!r} with seed {row.get('seed')} for unit {row['index']} where this run has "
                f"{expected[0]!r} with seed {expected[1]}")
    return None


def _merge(out: Path, wanted: list[int]) -> None:
    """Main process: every row once (the last written wins), ordered by unit, into manifest.jsonl; parts removed."""
    by_index = {row["index"]: row for row in existing_rows(out) if (out / str(row.get("file", ""))).is_file()}
    missing = [i for i in wanted if i not in by_index]
    if missing:
        raise RuntimeError(f"sampling finished without the image(s) of unit(s) {missing[:5]} in {out}")
    write_manifest(out, [by_index[i] for i in sorted(by_index)])


def sample_units(pipe: DiffusionPipeline, folder: str | Path, units: list[int], items: RetryItems,
                 settings: GenerationSettings, *,
                 overwrite: bool = False, processes: Processes | None = None) -> dict[int, GeneratedImage]:
    """Make the images of `units` (unit i: `items(i)`) in `folder` unless they are there; {unit: image}.

    `settings.seed` and `num_images_per_prompt` are not used (every unit has its own seed, one image). Every
    process calls this with the same arguments.
    """
    procs = processes or Processes()
    out = ensure_writable_dir(folder)
    height, width = settings.height or native_size(pipe), settings.width or native_size(pipe)
    record = _settings_record(pipe, GenerationSettings(**{**asdict(settings), "num_images_per_prompt": 1}), height, width)

    procs.barrier()
    rows = existing_rows(out)
    why = next((w for w in (_mismatch(row, items, record) for row in rows) if w), None)
    procs.barrier()  # every process has read the folder before anything in it changes
    if why is not None:
        if not overwrite:
            raise UserError(f"'{out}' already holds images of other settings ({why}): choose another output_dir, or "
                            "set overwrite: true to replace them")
        if procs.is_main:
            print(f"overwrite: replacing the candidate images of other settings in {out}", flush=True)
            clear(out, rows)
        procs.barrier()
        rows = []
    done = {row["index"] for row in rows if (out / str(row.get("file", ""))).is_file()}
    todo = [i for i in units if i not in done]
    mine = todo[procs.index :: procs.count]
    pipe.set_progress_bar_config(disable=True)
    with part_file(out, procs.index).open("a", encoding="utf-8") as part:
        for start in range(0, len(mine), settings.batch_size):
            batch = mine[start : start + settings.batch_size]
            prompts, seeds = zip(*(items(i) for i in batch))
            kwargs = {}
            if settings.negative_prompt is not None:
                kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
            images = pipe(
                prompt=list(prompts), height=height, width=width, num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds], **kwargs,
            ).images
            for index, prompt, seed, image in zip(batch, prompts, seeds, images):
                name = f"{index:05d}.png"
                image.save(out / name)  # the row follows the image: a listed image is a whole file
                row = GeneratedImage(file=name, prompt=prompt, seed=seed, index=index)
                part.write(json.dumps({**asdict(row), "settings": record}) + "\n")
            part.flush()
    procs.barrier()
    if procs.is_main:
        _merge(out, units)
    procs.barrier()
    by_index = {row["index"]: row for row in existing_rows(out)}
    return {i: GeneratedImage(by_index[i]["file"], by_index[i]["prompt"], by_index[i]["seed"], i) for i in units}


__all__ = ["sample_units"]
