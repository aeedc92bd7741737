"""Score folders written by `diffalign generate` with rewards and compare them (`diffalign evaluate`).

`evaluate_folders` reads each folder's manifest.jsonl, scores every image with every reward (in batches,
sharded over processes under `accelerate launch`, gathered on every process), and computes per reward and
folder the mean with a bootstrap CI, plus each folder's win rate against each baseline on images matched by
(prompt, seed). With `distribution` (e.g. "toy"), each folder also gets set-level measures against ground-truth
references of its prompts (FD, precision, recall; `toy_distribution`), and each folder against each baseline
their paired differences. With `out_dir`, the main process alone writes metrics.json, scores.csv, plots and
report.html (`report.write_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..fsutil import ensure_writable_dir
from ..generation.manifest import read_manifest
from ..processes import join_processes
from ..rewards import Reward, get_reward
from .report import write_report
from .result import EvaluationResult, ImageRecord
from .stats import WinRate, bootstrap_ci, check_bootstrap_options, match_pairs, paired_win_rate
from .toy_distribution import build_distribution

# ---------------------------------------------------------------------------------------------- inputs


def parse_folder_args(items: Sequence[str]) -> dict[str, str]:
    """`DIR` or `LABEL=DIR` items -> {label: dir}; a label defaults to the folder's name."""
    folders: dict[str, str] = {}
    for item in items:
        label, sep, path = str(item).partition("=")
        if not sep or Path(item).is_dir():  # a folder whose name holds '=' is still a folder
            label, path = Path(item).name or str(item), str(item)
        label = label.strip()
        if not label:
            raise UserError(f"folder argument '{item}' has an empty label: write LABEL=DIR or just DIR")
        if label in folders:
            raise UserError(f"two folders are labelled '{label}' ({folders[label]} and {path}): name them with LABEL=DIR")
        folders[label] = path
    return folders


def load_folder(folder: str | Path, label: str) -> list[ImageRecord]:
    """The manifest rows of one folder written by `diffalign generate`."""
    folder = Path(folder)
    if not (folder / "manifest.jsonl").is_file():
        raise UserError(f"folder '{folder}' (label '{label}') has no manifest.jsonl: point --images/--baseline at a "
                        "folder written by 'diffalign generate'")
    try:
        rows = read_manifest(folder)
    except ValueError as exc:
        raise UserError(f"{folder / 'manifest.jsonl'} is not valid JSONL ({exc}): regenerate the folder") from None
    records = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{folder / 'manifest.jsonl'}:{number}: a row needs a string 'file' and 'prompt'")
        from ..safety.paths import outside_reason

        reason = outside_reason(folder, row["file"])
        if reason:  # refused with --lenient too: an untrusted manifest, not a missing image
            raise UserError(f"{folder / 'manifest.jsonl'}:{number}: 'file' is {row['file']!r}, {reason} outside the "
                            "folder; a manifest may only name images inside its own folder (refusing to read it)")
        records.append(ImageRecord(label, str(folder), row["file"], row["prompt"], row.get("seed"), row.get("index")))
    if not records:
        raise UserError(f"{folder / 'manifest.jsonl'} lists no images")
    return records


def load_image(path: Path):
    """(RGB PIL image, None) or (None, reason) for a missing or undecodable file."""
    from PIL import Image, UnidentifiedImageError

    from ..safety.images import to_rgb

    try:
        with Image.open(path) as image:
            return to_rgb(image), None
    except FileNotFoundError:
        return None, "missing"
    except Image.DecompressionBombError as exc:  # not an OSError: counted as unreadable, as training does
        return None, f"corrupt (DecompressionBombError: {str(exc).splitlines()[0]})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return None, f"corrupt ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def build_rewards(specs: Sequence[str | Reward], device=None, batch_size: int | None = None) -> dict[str, Reward]:
    """{column name: reward}; names are the reward names, numbered when a name repeats (`clip`, `clip-2`)."""
    rewards: dict[str, Reward] = {}
    for spec in specs:
        reward = spec if isinstance(spec, Reward) else get_reward(spec, device=device, batch_size=batch_size)
        name = reward.name or type(reward).__name__
        column, k = name, 2
        while column in rewards:
            column, k = f"{name}-{k}", k + 1
        rewards[column] = reward
    if not rewards:
        raise UserError("no rewards given: pass --rewards, e.g. --rewards toy or --rewards pickscore=FOLDER,clip=FOLDER")
    return rewards


# --------------------------------------------------------------------------------------------- scoring


def _score_column(name: str, reward: Reward, images: list, prompts: list[str]) -> np.ndarray:
    values = reward.score(images, prompts)
    values = values.detach().float().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=np.float64)
    if values.shape != (len(images),):
        raise UserError(f"reward {name} returned scores of shape {values.shape} for {len(images)} images; "
                        "a reward's score() must return one value per image (Tensor[N])")
    return values


def score_shard(records: Sequence[ImageRecord], indices: Sequence[int], rewards: Mapping[str, Reward],
                batch_size: int, show_progress: bool = True) -> list[tuple[int, list[float] | None, str | None]]:
    """Score `records[i]` for i in `indices`: [(i, one score per reward or None, problem or None)]."""
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=len(indices), desc="evaluate", unit="img", disable=not show_progress)
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        loaded = [(i, *load_image(records[i].path)) for i in chunk]
        good = [(i, image) for i, image, problem in loaded if problem is None]
        out += [(i, None, problem) for i, _, problem in loaded if problem is not None]
        if good:
            images = [image for _, image in good]
            prompts = [records[i].prompt for i, _ in good]
            columns = [_score_column(name, reward, images, prompts) for name, reward in rewards.items()]
            for row, (i, _) in enumerate(good):
                out.append((i, [float(c[row]) for c in columns], None))
        bar.update(len(chunk))
    bar.close()
    return out


def _score_distributed(records, rewards, batch_size, state):
    """Each process scores its shard; every process gets all results, ordered by record index."""
    from accelerate.utils import gather_object

    with state.split_between_processes(list(range(len(records)))) as shard:
        local = score_shard(records, shard, rewards, batch_size, show_progress=state.is_local_main_process)
    merged = gather_object(local) if state.num_processes > 1 else local
    return sorted(merged, key=lambda item: item[0])


# --------------------------------------------------------------------------------------------- metrics


def _check_finite(result: EvaluationResult) -> None:
    bad = np.argwhere(~np.isfinite(result.scores))
    if len(bad):
        i, r = bad[0]
        raise UserError(f"reward {result.rewards[r]} gave {len(bad)} non-finite score(s) (NaN/inf), e.g. for "
                        f"{result.records[i].path} (prompt {result.records[i].prompt!r}): check the reward's weights "
                        "and inputs")


def compute_metrics(result: EvaluationResult) -> EvaluationResult:
    """Fill `result.means` and `result.win_rates` from its scores (pure: no models, no files)."""
    result.means, result.win_rates = {}, {}
    _check_finite(result)
    for r, reward in enumerate(result.rewards):
        result.means[reward] = {
            label: bootstrap_ci(result.scores[result.rows_of(label), r], result.bootstrap, result.seed, result.level)
            for label in result.labels
        }
        per: dict[tuple[str, str], WinRate] = {}
        for label, baseline in result.comparisons:
            rows, base_rows = result.rows_of(label), result.rows_of(baseline)
            per[(label, baseline)] = paired_win_rate(
                result.scores[rows, r], [result.records[i].key for i in rows],
                result.scores[base_rows, r], [result.records[i].key for i in base_rows],
                result.bootstrap, result.seed, result.level,
            )
        if per:
            result.win_rates[reward] = per
    return result


def _label_features(result: EvaluationResult, measure) -> dict[str, np.ndarray]:
    """The measure's features of every scored image, per label (the images are read again)."""
    features = {}
    for label in result.labels:
        rows = result.rows_of(label)
        if len(rows) <= measure.k:
            raise UserError(f"folder '{label}' has {len(rows)} scored image(s); the distribution measures need more "
                            f"than k={measure.k}: add images or lower k (e.g. --distribution toy:k=1)")
        features[label] = measure.features([load_image(result.records[i].path)[0] for i in rows])
    return features


def compute_distribution_metrics(result: EvaluationResult, measure, show_progress: bool = False,
                                 processes: int = 1) -> EvaluationResult:
    """Fill `result.distribution` (each folder against the reference of its prompts) and
    `result.distribution_differences` (each comparison's folder minus its baseline on images matched by
    (prompt, seed), against the reference of the matched prompts). `measure` is a
    `toy_distribution.ToyDistribution`. The bootstraps run in `processes` processes (same results)."""
    from tqdm.auto import tqdm

    from .distribution import run_jobs

    features = _label_features(result, measure)
    result.distribution_settings = measure.describe()
    result.distribution, result.distribution_differences = {}, {}
    jobs, keys = [], []
    for label in result.labels:
        prompts = [result.records[i].prompt for i in result.rows_of(label)]
        jobs.append(measure.set_job(features[label], prompts, seed=result.seed, level=result.level))
        keys.append(("set", label))
    for label, baseline in result.comparisons:
        rows, base_rows = result.rows_of(label), result.rows_of(baseline)
        pairs, unmatched_a, unmatched_b = match_pairs([result.records[i].key for i in rows],
                                                      [result.records[j].key for j in base_rows])
        if len(pairs) <= measure.k:
            raise UserError(f"'{label}' and baseline '{baseline}' share {len(pairs)} (prompt, seed) pair(s); the "
                            f"paired distribution difference needs more than k={measure.k}")
        ia, ib = [i for i, _ in pairs], [j for _, j in pairs]
        jobs.append(measure.difference_job(
            features[label][ia], features[baseline][ib], [result.records[rows[i]].prompt for i in ia],
            seed=result.seed, level=result.level, unmatched_a=unmatched_a, unmatched_b=unmatched_b))
        keys.append(("difference", (label, baseline)))
    bar = tqdm(total=len(jobs), desc="distribution", unit="set", disable=not show_progress)
    for (kind, key), measured in zip(keys, run_jobs(jobs, processes)):
        (result.distribution if kind == "set" else result.distribution_differences)[key] = measured
        bar.update()
    bar.close()
    return result


def _problems_message(problems: list[dict]) -> str:
    shown = "; ".join(f"{p['path']}: {p['reason']}" for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return (f"{len(problems)} image file(s) cannot be read: {shown}{more}. Regenerate or remove them from "
            "manifest.jsonl, or pass --lenient to skip them (they are counted in the report)")


def evaluate_folders(
    folders: Mapping[str, str | Path],
    rewards: Sequence[str | Reward],
    out_dir: str | Path | None = None,
    baseline: str | Sequence[str] | None = None,
    *,
    bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    batch_size: int = 16,
    device=None,
    lenient: bool = False,
    grid_rows: int = 12,
    distribution=None,
    compare: Sequence[tuple[str, str]] = (),
    processes: int = 1,
) -> EvaluationResult:
    """Score every image of `folders` ({label: folder}) with every reward and compare against `baseline`.

    `rewards` are specs for `get_reward` (or built `Reward`s). `baseline` is a label of `folders` (or several);
    every other folder is compared with each. `compare`: more (label, baseline) pairs to compare, e.g. a tuned
    model with its negative against the tuned model alone, without making the latter a baseline of all.
    `distribution`: a spec for `toy_distribution.build_distribution` (e.g. "toy", "toy:k=5") or a built
    `ToyDistribution`, for set-level measures (None: none), whose bootstraps run in `processes` processes
    (the same figures; each process forks this one). With `out_dir`,
    the main process writes the report files and `result.report_path` is report.html. Works unchanged under
    `accelerate launch` (images sharded by process; the set-level measures, on the gathered images, are
    computed by every process alike).
    """
    if not folders:
        raise UserError("no image folders given: pass --images DIR (or LABEL=DIR)")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if int(processes) != processes or processes < 1:
        raise UserError(f"--processes must be a positive integer (got {processes})")
    check_bootstrap_options(bootstrap, level)  # before the scoring, not after it
    baselines = [baseline] if isinstance(baseline, str) else list(baseline or [])
    for b in baselines:
        if b not in folders:
            raise UserError(f"baseline '{b}' is not one of the folders' labels ({', '.join(folders)})")
    compare = [tuple(pair) for pair in compare]
    for pair in compare:
        if len(pair) != 2 or any(name not in folders for name in pair) or pair[0] == pair[1]:
            raise UserError(f"compare {list(pair)}: give two different labels of the folders ({', '.join(folders)}), "
                            "the folder first, then the one it is compared against")
    state = join_processes()  # otherwise each process would score everything alone and write the report
    measure = None
    if distribution is not None:  # built (and its spec checked) before the scoring, not after it

        measure = (build_distribution(distribution, device=device if device is not None else state.device)
                   if isinstance(distribution, str) else distribution)
    if out_dir is not None:  # checked on every process, so that all stop together instead of waiting on a gather

        ensure_writable_dir(out_dir)
    records = [rec for label, path in folders.items() for rec in load_folder(path, label)]
    built = build_rewards(rewards, device=device if device is not None else state.device, batch_size=batch_size)
    scored = _score_distributed(records, built, batch_size, state)
    problems = [{"label": records[i].label, "file": records[i].file, "path": str(records[i].path), "reason": reason}
                for i, _, reason in scored if reason is not None]
    if problems and not lenient:
        raise UserError(_problems_message(problems))
    kept = [(records[i], values) for i, values, reason in scored if reason is None]
    result = EvaluationResult(
        folders={label: str(path) for label, path in folders.items()},
        rewards=list(built), reward_specs={name: r.spec or name for name, r in built.items()},
        records=[rec for rec, _ in kept],
        scores=np.array([values for _, values in kept], dtype=np.float64).reshape(len(kept), len(built)),
        baselines=baselines, extra_comparisons=compare, skipped=problems, bootstrap=bootstrap, seed=seed, level=level,
    )
    compute_metrics(result)
    if measure is not None:
        compute_distribution_metrics(result, measure, show_progress=state.is_local_main_process,
                                     processes=processes)
    if out_dir is not None and state.is_main_process:
        result.report_path = write_report(result, out_dir, grid_rows=grid_rows)
    return result
