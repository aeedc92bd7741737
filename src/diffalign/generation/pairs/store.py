"""The output folder of `diffalign pairs`: its layout, the config check, shards and the summary.

    output_dir/
      pairs_config.yaml          the resolved config; a re-run is compared against it
      images/<job>/              candidate images (`diffalign generate` folders: PNGs + manifest.jsonl)
      data/train-00000.parquet   shard s: the pairs of units [s * shard_size, (s + 1) * shard_size)
      summary.json               units, pairs, kept share, skipped by reason, tries (with a filter or max_tries),
                                 score means, the dataset_name to train on

Shards are named `train-*` so that `datasets.load_dataset(output_dir)` (and so `diffalign train
--dataset_name=output_dir`) reads them as the train split and not the PNGs beside them. Each is written under
a temporary name and renamed; its parquet footer (key `diffalign`) records the config fingerprint, its unit
range and its counts, so a re-run knows which shards are complete and the summary can be rebuilt from them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...config_loader import dump_config, load_config
from ...errors import UserError
from ...fsutil import atomic_write_text, ensure_writable_dir
from .config import PairsConfig, changed_keys

CONFIG_FILE = "pairs_config.yaml"
SUMMARY_FILE = "summary.json"
DATA_DIR = "data"
IMAGES_DIR = "images"
METADATA_KEY = "diffalign"
ROWS_PER_GROUP = 16  # parquet row group: a shard's images are never all in memory at once


def schema():
    import pyarrow as pa

    return pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()),
        ("recipe", pa.string()), ("model", pa.string()), ("lora", pa.string()),
        ("prompt_0", pa.string()), ("prompt_1", pa.string()), ("seed_0", pa.int64()), ("seed_1", pa.int64()),
        ("settings", pa.string()), ("score_0", pa.float64()), ("score_1", pa.float64()), ("pair_index", pa.int64()),
    ])


@dataclass
class PairsResult:
    """What a run wrote; `dataset_name` is the value to pass to `diffalign train --dataset_name`."""

    output_dir: Path
    dataset_name: str
    units: int
    pairs: int
    shards: int
    skipped: dict = field(default_factory=dict)  # reason -> count
    scores: dict = field(default_factory=dict)  # chosen_mean, rejected_mean, gap_mean of the pairs written (None: no reward)
    reused_shards: int = 0
    kept_share: float | None = None  # pairs / (units x pair slots per unit)
    tries: dict = field(default_factory=dict)  # with a filter or max_tries: max_tries, sampled, kept_on_try, failed

    def summary(self) -> str:
        text = f"{self.pairs} pairs from {self.units} units in {self.shards} shard(s)"
        if self.kept_share is not None and self.kept_share < 1:
            text += f", kept {100 * self.kept_share:.1f}%"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) + ")"
        if self.tries:
            kept_on = {int(t): n for t, n in self.tries["kept_on_try"].items()}
            later = sum(n for t, n in kept_on.items() if t > 1)
            text += f"; tries: {self.tries['sampled']} used (at most {self.tries['max_tries']} a unit)"
            if kept_on:
                mean = sum(t * n for t, n in kept_on.items()) / sum(kept_on.values())
                text += f", pairs kept on try 1: {kept_on.get(1, 0)}, on later tries: {later} (mean try {mean:.2f})"
            failed = ", ".join(f"{n} {why}" for why, n in self.tries["failed"].items())
            text += f"; failed tries: {failed or 'none'}"
        if self.scores.get("gap_mean") is not None:
            text += f"; mean score chosen {self.scores['chosen_mean']:.4g}, rejected {self.scores['rejected_mean']:.4g}"
        return text


def images_root(cfg: PairsConfig) -> Path:
    return Path(cfg.images_dir) if cfg.images_dir else Path(cfg.output_dir) / IMAGES_DIR


def shard_path(cfg: PairsConfig, s: int) -> Path:
    return Path(cfg.output_dir) / DATA_DIR / f"train-{s:05d}.parquet"


# ------------------------------------------------------------------------------------------- the folder
def prepare_output(cfg: PairsConfig) -> None:
    """Make `output_dir` ready and write the resolved config into it.

    A folder holding pairs of the same config (same `data_settings`) is resumed. One made with another config
    is refused, naming the keys that differ, unless `overwrite: true`: then its data and summary are deleted
    (candidate images are checked when sampling: same settings are reused, others replaced); a folder whose
    run made nothing yet is taken over without it. A non-empty folder without pairs_config.yaml is never
    touched. Temporary shards of a killed run are removed.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file; give a folder")
    if (out / CONFIG_FILE).is_file():
        new = cfg.data_settings()
        try:
            old = load_config(PairsConfig, out / CONFIG_FILE).data_settings()
            why = "changed: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed_keys(old, new)[:4])
        except UserError as exc:
            old, why = None, f"its {CONFIG_FILE} cannot be read: {exc}"
        if old != new:
            # A run that died before making anything (say, a model path that did not load) is not worth keeping.
            made = any((out / DATA_DIR).glob("*.parquet")) or any((out / IMAGES_DIR).rglob("*.png"))
            if made and not cfg.overwrite:
                raise UserError(f"output_dir '{out}' holds pairs made with another config ({why}); choose another "
                                "output_dir, or set overwrite: true to delete its data and start again")
            shutil.rmtree(out / DATA_DIR, ignore_errors=True)
            (out / SUMMARY_FILE).unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"output_dir '{out}' is not empty and holds no {CONFIG_FILE}, so it is not a diffalign pairs "
                        "folder; choose a new or empty folder")
    ensure_writable_dir(out / DATA_DIR, "output_dir", "output_dir")
    for stray in (out / DATA_DIR).glob(".*.tmp"):  # a shard whose writer was killed: never renamed, never data
        stray.unlink()
    dump_config(cfg, out / CONFIG_FILE)


# ---------------------------------------------------------------------------------------------- shards
def shard_info(path: Path) -> dict | None:
    """The footer record of a shard written here, or None (absent or unreadable: it is written again)."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_metadata(path).metadata or {}).get(METADATA_KEY.encode())
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def complete_shards(cfg: PairsConfig, bounds: list[tuple[int, int, int]]) -> dict[int, dict]:
    """{shard: footer record} of the shards already written by this config with these unit ranges."""
    done = {}
    for s, a, b in bounds:
        info = shard_info(shard_path(cfg, s))
        if info and info.get("fingerprint") == cfg.fingerprint() and info.get("units") == [a, b]:
            done[s] = info
    return done


def write_shard(cfg: PairsConfig, s: int, rows, info: dict) -> dict:
    """Write the rows (an iterable of dicts, consumed in row groups) as shard s, atomically.

    `info` (counts) may be filled while the rows are produced; it goes into the footer once they are all written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = shard_path(cfg, s)
    tmp = target.with_name(f".{target.name}.tmp")
    table_schema = schema()
    with pq.ParquetWriter(tmp, table_schema) as writer:
        group: list[dict] = []
        count = 0
        for row in rows:
            group.append(row)
            count += 1
            if len(group) == ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(group, schema=table_schema))
                group = []
        if group or not count:  # an empty shard still gets its schema: it marks its units as done
            writer.write_table(pa.Table.from_pylist(group, schema=table_schema))
        info = {"fingerprint": cfg.fingerprint(), "shard": s, **info}
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(info, sort_keys=True)})
    os.replace(tmp, target)
    return info


def read_pairs(output_dir: str | os.PathLike):
    """All shards of an output folder as one pyarrow table, in shard order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(output_dir) / DATA_DIR).glob("train-*.parquet"))
    if not files:
        raise UserError(f"'{output_dir}' holds no {DATA_DIR}/train-*.parquet: run `diffalign pairs` into it first")
    return pa.concat_tables([pq.read_table(f) for f in files])


# --------------------------------------------------------------------------------------------- summary
def _tries(cfg: PairsConfig, infos: list[dict]) -> dict:
    """The shards' try counts added up: tries sampled, kept pairs by the try that made them, failed tries by reason."""
    if not cfg.checks_pairs:
        return {}
    kept_on: Counter = Counter()
    failed: Counter = Counter()
    for info in infos:
        kept_on.update(info["tries"]["kept_on_try"])
        failed.update(info["tries"]["failed"])
    return {"max_tries": cfg.max_tries, "sampled": sum(i["tries"]["sampled"] for i in infos),
            "kept_on_try": dict(sorted(kept_on.items(), key=lambda kv: int(kv[0]))), "failed": dict(sorted(failed.items()))}


def write_summary(cfg: PairsConfig, infos: list[dict], *, units: int, candidates: int, source_skipped: Counter,
                  reused: int, slots: int = 1) -> PairsResult:
    """summary.json from the shards' footer records (so a resumed run reports what one run would).

    `candidates` counts the images of the recipe's jobs; the images of further tries are added from the shards."""
    skipped: Counter = Counter(source_skipped)
    for info in infos:
        skipped.update(info["skipped"])
    candidates += sum(i.get("extra_images", 0) for i in infos)
    scored = sum(i["scored_pairs"] for i in infos)
    scores = {"chosen_mean": None, "rejected_mean": None, "gap_mean": None}
    if scored:
        c, r = sum(i["chosen_score_sum"] for i in infos) / scored, sum(i["rejected_score_sum"] for i in infos) / scored
        scores = {"chosen_mean": c, "rejected_mean": r, "gap_mean": c - r}
    out = Path(cfg.output_dir)
    pairs = sum(i["pairs"] for i in infos)
    kept_share = pairs / (units * slots) if units else None
    result = PairsResult(out, str(out), units, pairs, len(infos), dict(sorted(skipped.items())), scores, reused,
                         kept_share, _tries(cfg, infos))
    summary = {"recipe": cfg.recipe, "fingerprint": cfg.fingerprint(), "units": units, "pairs": result.pairs,
               "kept_share": kept_share, "skipped": result.skipped, **({"tries": result.tries} if result.tries else {}),
               "scores": scores, "candidate_images": candidates,
               "shards": [shard_path(cfg, i["shard"]).name for i in infos], "dataset_name": result.dataset_name}
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return result
