"""`diffalign demo`: the whole loop on the shipped toy model, on a CPU, in minutes.

Stages (each in its own folder under `--out`; a finished stage is reused when its settings and the stages it
builds on are unchanged, so a re-run after an interruption goes on where it stopped). With `--jobs N` above 1 (the
default on a machine with several cores) N worker processes (`diffalign demo --worker`) each import torch and
diffusers once and run the stages the demo hands them, one after another; a stage starts as soon as the stages it
needs are done, so MaPO, DPO and Self-NPO train side by side, one torch thread each. Each stage's output goes to
`OUT/NAME.log`, and a worker resets what a stage could leave behind in its process (`_FreshState`), so a stage's
result does not depend on which worker ran it or after what:

1. `pairs`    preference pairs the toy model made of itself, ranked by the toy judge: four samples of each
              training prompt, the one that shows the asked shape and colour against one that does not
              (`configs/pairs/toy_ranked_fidelity.yaml`: 320 pairs from 2048 samples). They ship with the
              package so the demo does not spend minutes sampling them; `--pairs DIR` uses pairs you made.
2. `mapo`     a MaPO LoRA on those pairs (no reference model).
3. `dpo`      a Diffusion-DPO LoRA on the same pairs, same steps (the method users compare against).
4. `selfnpo`  a Self-NPO negative LoRA learned from the model itself: prompts only, no pairs, no labels.
5. `samples/NAME`  held-out prompts (colour/shape combinations no stage trained on) x fixed seeds, one stage
              per model: base, MaPO, DPO, base + Self-NPO in the negative branch, MaPO + Self-NPO (each starts
              as soon as the training stages it uses are done).
6. `report`   `diffalign evaluate` on those folders against base (and MaPO + Self-NPO against MaPO): the toy
              judge's shape+colour correctness (what the pairs were ranked by) and clarity, and the set-level
              quality measure (FD, precision, recall of each folder against ground-truth renders of its
              prompts); report.html opens with one picture of every model on the same prompts and seeds.

Every setting below is a measured toy recipe of `configs/` (toy_mapo.yaml and toy_dpo.yaml at 300 steps,
toy_selfnpo.yaml), fixed before its held-out runs, and the held-out protocol is theirs (8 prompts x 20 seeds,
guidance 7.5): the demo reruns the README's measured table on one machine, it does not select anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import UserError
from .fsutil import ensure_writable_dir
from .toy.paths import toy_pairs_path

GUIDANCE = 7.5
STEPS = 20  # sampling steps
SAMPLES_PER_PROMPT = 20  # held-out evaluation: 8 prompts x 20 seeds (0..159) per model
FIDELITY = "toy:term=shape_colour_correct"  # 1 when the judge reads the asked shape and colour, else 0
REWARDS = (FIDELITY, "toy:term=clarity")
DISTRIBUTION = "toy:refs=4"  # FD / precision / recall against 4 ground-truth renders per image
LORA = dict(train_mode="lora", rank=8, learning_rate=1e-4, train_batch_size=8, gradient_accumulation_steps=1,
            lr_scheduler="constant", mixed_precision="no", report_to="none", resolution=32,
            checkpoints_total_limit=1, validation_prompts=["a red circle", "a blue square"],
            validation_num_inference_steps=STEPS, validation_guidance_scale=GUIDANCE)
TRAIN = {
    # configs/toy_mapo.yaml, configs/toy_dpo.yaml (300 steps) and configs/toy_selfnpo.yaml; tests/test_demo.py
    # checks that these stay equal to the configs.
    "mapo": dict(method="mapo", mapo_preset="official", max_train_steps=300, checkpointing_steps=300,
                 validation_steps=300),
    "dpo": dict(method="dpo", beta=2000.0, max_train_steps=300, checkpointing_steps=300, validation_steps=300),
    "selfnpo": dict(method="selfnpo", dataset_name="toy", selfnpo_start="noise", teacher_ema_decay=0.99,
                    teacher_guidance=-1.0, ddim_grid=25, teacher_steps=5, selfnpo_loss="pseudo_huber", huber_c=1e-3,
                    trace_teacher=True,
                    adam_weight_decay=1e-3, max_train_steps=150, checkpointing_steps=75, validation_steps=150),
}
# name -> (positive LoRA stage or None, use the Self-NPO negative); also the overview's row order
MODELS = {
    "base": (None, False),
    "mapo": ("mapo", False),
    "dpo": ("dpo", False),
    "base+selfnpo": (None, True),
    "mapo+selfnpo": ("mapo", True),
}
# Every model is compared with base; the tuned model plus its negative also with the tuned model alone.
VERSUS_TUNED = ("mapo+selfnpo", "mapo")


def default_jobs() -> int:
    """Stages run at once (`--jobs`): one per available core, at most 3."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(3, cores))


def split_prompts() -> tuple[list[str], list[str]]:
    """Training prompts ("a {colour} {shape}" except the held-out combinations) and the held-out ones."""
    from .toy.prompts import toy_prompts
    from .toy.world import COLOUR_NAMES, SHAPES, caption

    heldout = toy_prompts("heldout")
    train = [caption(shape=s, colour=c) for c in COLOUR_NAMES for s in SHAPES if caption(shape=s, colour=c) not in heldout]
    return train, heldout


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class Stage:
    name: str
    title: str
    settings: dict
    run: Callable[[Path], dict]
    needs: tuple[str, ...] = ()
    cost: float = 1.0  # relative run time: of the stages ready at once, the costliest starts first
    fingerprint: str = field(default="", init=False)


MARKER = "stage.json"


def _fingerprint(settings: dict, upstream: list[str]) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reusable(stage: Stage, folder: Path) -> dict | None:
    """The stage's record when its folder holds a finished run with the same fingerprint."""
    marker = folder / MARKER
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    return record if record.get("fingerprint") == stage.fingerprint else None


def _run_here(stage: Stage, folder: Path) -> dict:
    if folder.exists():  # unfinished, or made with other settings: start it again
        shutil.rmtree(folder)
    start = time.perf_counter()
    summary = stage.run(folder)
    seconds = time.perf_counter() - start
    (folder / MARKER).write_text(json.dumps({"fingerprint": stage.fingerprint, "seconds": seconds, "summary": summary},
                                            indent=2))
    return {"fingerprint": stage.fingerprint, "seconds": seconds, "summary": summary}


def _tail(log_path: Path, lines: int = 15) -> str:
    if not log_path.exists():
        return "(no output)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class _Worker:
    """The parent's view of one worker process: the stage it runs (None: idle) and what it said so far."""

    number: int
    proc: subprocess.Popen
    received: bytes = b""
    stage: Stage | None = None
    log_path: Path | None = None
    started: float = 0.0


def _run_apart(todo: list[Stage], stages: list[Stage], out: Path, launch: Sequence[str], jobs: int,
               finished: set[str], log) -> None:
    """Run the stages of `todo` in up to `jobs` worker processes, each stage as soon as the stages it needs are in
    `finished`, the costliest ready stage first. `launch` is the command line of one worker (`diffalign demo ...
    --worker`, which calls `run_worker`); a stage that starts beside others (running or ready) gets one torch thread,
    one that starts alone gets `jobs`. A stage that fails, or a worker that dies, stops the demo with a UserError
    quoting the end of the stage's log; every worker is stopped when this returns or raises."""
    number = {s.name: i for i, s in enumerate(stages, 1)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # numpy/BLAS: one thread; torch: per stage
    workers: list[_Worker] = []
    selector = selectors.DefaultSelector()

    def died(worker: _Worker) -> None:
        """Its channel ended or its process is gone: a failure of the stage it ran (or of the worker itself)."""
        try:
            code = worker.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed its channel but lives on
            worker.proc.kill()
            code = worker.proc.wait()
        if worker.stage is None:
            raise UserError(f"demo worker {worker.number} stopped (exit {code}) with no stage to run; its messages "
                            "are above")
        raise UserError(f"the demo stage {worker.stage.name!r} failed: its worker {worker.number} died (exit {code}); "
                        f"the end of {worker.log_path}:\n{_tail(worker.log_path)}")

    def receive(worker: _Worker) -> bool:
        """Read what the worker said (never blocks); act on each finished stage. False at the end of its channel."""
        while True:
            try:
                chunk = os.read(worker.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            worker.received += chunk
            while b"\n" in worker.received:
                line, worker.received = worker.received.split(b"\n", 1)
                answer = json.loads(line)
                stage = worker.stage
                if stage is None or answer.get("stage") != stage.name:
                    raise UserError(f"demo worker {worker.number} reported {answer!r}, which it was not running")
                if not answer.get("ok"):
                    raise UserError(f"the demo stage {stage.name!r} failed in worker {worker.number}; the end of "
                                    f"{worker.log_path}:\n{_tail(worker.log_path)}")
                worker.stage = None
                finished.add(stage.name)
                log(f"[{number[stage.name]}/{len(stages)}] {stage.title}: done in "
                    f"{time.perf_counter() - worker.started:.0f} s")

    try:
        for k in range(1, min(jobs, len(todo)) + 1):
            proc = subprocess.Popen(list(launch), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            os.set_blocking(proc.stdout.fileno(), False)
            workers.append(_Worker(k, proc))
            selector.register(proc.stdout.fileno(), selectors.EVENT_READ, workers[-1])
        waiting = list(todo)
        while waiting or any(w.stage is not None for w in workers):
            ready = sorted((s for s in waiting if all(d in finished for d in s.needs)), key=lambda s: -s.cost)
            idle = [w for w in workers if w.stage is None]
            while ready and idle:
                stage, worker = ready.pop(0), idle.pop(0)
                waiting.remove(stage)
                busy = any(w.stage is not None for w in workers)
                threads = 1 if ready or busy else jobs
                worker.stage, worker.log_path, worker.started = stage, out / f"{stage.name}.log", time.perf_counter()
                log(f"[{number[stage.name]}/{len(stages)}] {stage.title} ... (worker {worker.number}, {threads} "
                    f"thread(s); its output: {worker.log_path})")
                try:
                    worker.proc.stdin.write((json.dumps({"stage": stage.name, "threads": threads}) + "\n").encode())
                    worker.proc.stdin.flush()
                except OSError:  # BrokenPipeError: it is gone
                    died(worker)
            if not any(w.stage is not None for w in workers):
                raise UserError(f"the demo stages {[s.name for s in waiting]} wait for stages that are not there")
            for key, _ in selector.select(timeout=1.0):
                if not receive(key.data):
                    died(key.data)
            for worker in workers:  # gone without closing its channel (a child of it holds the pipe open)
                if worker.stage is not None and worker.proc.poll() is not None:
                    receive(worker)  # what it said before it went
                    if worker.stage is not None:
                        died(worker)
    except BaseException:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.terminate()
        raise
    finally:
        for worker in workers:  # the end of its stdin: an idle worker returns
            try:
                worker.proc.stdin.close()
            except OSError:
                pass
        for worker in workers:
            try:
                worker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a stage that does not stop on SIGTERM
                worker.proc.kill()
                worker.proc.wait()
            worker.proc.stdout.close()
        selector.close()


class _FreshState:
    """What a stage could leave behind in a worker's process and change in the next stage it runs there, as it
    was when the worker started; `restore()` puts it back before every stage, as in a fresh process:

    - accelerate's process-wide `AcceleratorState`/`PartialState`/`GradientState` (set by the first `Accelerator` or
      `PartialState`: a later `Accelerator` with another `mixed_precision` would be refused);
    - the global random generators (torch's starts from a fixed seed in a fresh process; the stages seed their
      own draws, this is for any draw that does not);
    - torch's grad mode, deterministic-algorithm, default-dtype, float32-matmul and cuDNN flags;
    - the transformers/diffusers logging levels and the working directory;
    - the registries of warnings already shown, so each stage's log shows its warnings as a fresh process would.
    """

    LOGGERS = ("transformers", "diffusers", "accelerate", "peft")

    def __init__(self):
        import logging
        import random

        import numpy as np
        import torch

        self.torch_rng = torch.get_rng_state()
        self.numpy_rng = np.random.get_state()
        self.python_rng = random.getstate()
        self.grad = torch.is_grad_enabled()
        self.deterministic = (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled())
        self.dtype = torch.get_default_dtype()
        self.matmul = torch.get_float32_matmul_precision()
        self.cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
        self.levels = {name: logging.getLogger(name).level for name in self.LOGGERS}
        self.cwd = os.getcwd()

    def restore(self) -> None:
        import logging
        import random
        import warnings

        import numpy as np
        import torch

        if "accelerate.state" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        torch.set_rng_state(self.torch_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)
        torch.set_grad_enabled(self.grad)
        torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        torch.set_default_dtype(self.dtype)
        torch.set_float32_matmul_precision(self.matmul)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = self.cudnn
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        os.chdir(self.cwd)
        getattr(warnings, "onceregistry", {}).clear()
        for module in list(sys.modules.values()):
            registry = getattr(module, "__dict__", {}).get("__warningregistry__")
            if registry:
                registry.clear()


@contextmanager
def _output_to(log_path: Path):
    """File descriptors 1 and 2 (so C-level output and child processes too) into `log_path` while inside."""
    import ctypes

    def flush() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers: written where they belong, not into the next log
        except (OSError, AttributeError):
            pass

    log_path.parent.mkdir(parents=True, exist_ok=True)
    flush()
    saved = os.dup(1), os.dup(2)
    with log_path.open("wb") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    try:
        yield
    finally:
        flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_worker(stages: list[Stage], out: Path) -> None:
    """A demo worker (`diffalign demo --worker`): run the stages the parent sends, one after another, here.

    Reads one JSON line per stage on stdin (`{"stage": NAME, "threads": N}`), runs it as `run_stages(...,
    only=NAME)` does with N torch threads and its output in `OUT/NAME.log`, and answers one JSON line
    (`{"stage": NAME, "ok": true|false}`) on the channel that was its stdout; a failure's message or traceback
    goes to the log. Returns at the end of stdin. Between stages its stdout and stderr both go to its stderr."""
    import faulthandler
    import gc
    import traceback

    import torch

    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing a stage or a library prints can reach the channel
    sys.stdout.reconfigure(line_buffering=True)  # a log shows each line as it is printed
    faulthandler.enable()  # a crash (segfault) prints its traceback on fd 2: the log of the stage that crashed
    fresh = _FreshState()
    for line in iter(sys.stdin.readline, ""):
        order = json.loads(line)
        name, ok = order["stage"], False
        with _output_to(out / f"{name}.log"):
            fresh.restore()
            torch.set_num_threads(int(order["threads"]))
            try:
                run_stages(stages, out, only=name)
                ok = True
            except UserError as exc:  # as the CLI prints it
                print(f"diffalign demo: error: {exc}", file=sys.stderr)
            except Exception:
                traceback.print_exc()
        gc.collect()  # the stage's models go before the next one loads its own
        channel.write(json.dumps({"stage": name, "ok": ok}) + "\n")
        channel.flush()


def run_stages(stages: list[Stage], out: Path, log=print, *, jobs: int = 1, launch: Sequence[str] | None = None,
               only: str | None = None) -> dict[str, dict]:
    """Run each stage whose folder has no matching `stage.json`; reuse the others. Returns summaries.

    With `jobs` > 1 (and `launch`, the command line of a worker process that calls `run_worker`) the stages run
    in up to `jobs` workers, side by side where they do not wait for each other. `only`: run that stage (the ones
    it needs must be finished) and stop; what a worker does for each stage it is given."""
    by_name = {s.name: s for s in stages}
    for stage in stages:  # in order: a stage's upstream fingerprints are set before its own
        stage.fingerprint = _fingerprint(stage.settings, [by_name[n].fingerprint for n in stage.needs])
    if only is not None:
        stage = by_name[only]
        missing = [n for n in stage.needs if _reusable(by_name[n], out / n) is None]
        if missing:
            raise UserError(f"the demo stage {only!r} needs the finished stages {missing} in {out}")
        _run_here(stage, out / stage.name)
        return {}
    summaries: dict[str, dict] = {}
    todo = []
    for i, stage in enumerate(stages, 1):
        record = _reusable(stage, out / stage.name)
        if record is None:
            todo.append(stage)
            continue
        log(f"[{i}/{len(stages)}] {stage.title}: reused ({out / stage.name}, took {record['seconds']:.0f} s when made)")
        summaries[stage.name] = {**record["summary"], "seconds": record["seconds"], "reused": True}
    apart = jobs > 1 and launch is not None and bool(todo)
    if apart:
        _run_apart(todo, stages, out, launch, jobs, set(summaries), log)
    for stage in todo:
        if apart:
            record = _reusable(stage, out / stage.name)
        else:
            i = stages.index(stage) + 1
            log(f"[{i}/{len(stages)}] {stage.title} ...")
            record = _run_here(stage, out / stage.name)
            log(f"[{i}/{len(stages)}] {stage.title}: done in {record['seconds']:.0f} s")
        summaries[stage.name] = {**record["summary"], "seconds": record["seconds"], "reused": False}
    return {s.name: summaries[s.name] for s in stages}


# ------------------------------------------------------------------------------------------ stage bodies
def _load_toy():
    from .models import load_pipeline

    return load_pipeline("toy")


def pairs_summary(pairs_dir: Path) -> dict:
    """What a pairs folder holds (its summary.json, as `diffalign pairs` writes it), for the stage's record."""
    summary_file = pairs_dir / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"'{pairs_dir}' has no summary.json: pass a folder written by `diffalign pairs`")
    summary = json.loads(summary_file.read_text())
    return {"pairs_dir": str(pairs_dir), "pairs": summary.get("pairs"), "units": summary.get("units")}


def _use_pairs(pairs_dir: Path) -> Callable[[Path], dict]:
    def run(folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        return pairs_summary(pairs_dir)

    return run


def _folder_digest(folder: Path) -> str:
    """A digest of every file's name and bytes under `folder`: the pairs stage reruns (and so does training)
    when the pairs change."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _train(method: str, pairs_dir: Path | None) -> Callable[[Path], dict]:
    def run(folder: Path) -> dict:
        from .training.config import TrainConfig
        from .training.loop import train

        settings = {**LORA, **TRAIN[method], "pretrained_model_name_or_path": "toy", "output_dir": str(folder), "seed": 0}
        if pairs_dir is not None:
            settings["dataset_name"] = str(pairs_dir)
        cfg = TrainConfig(**settings)
        cfg.validate()
        train(cfg)
        report = json.loads((folder / "train_report.json").read_text())
        return {"steps": report.get("steps"), "train_seconds": report.get("seconds")}

    return run


def _sample(out: Path, name: str) -> Callable[[Path], dict]:
    """Held-out prompts x seeds with one model of MODELS into `folder` (= OUT/samples/NAME)."""
    positive, negative = MODELS[name]

    def run(folder: Path) -> dict:
        from .generation import GenerationSettings, generate_to_folder
        from .guidance import attach_negative_guidance
        from .models import load_lora_into_pipeline

        _, heldout = split_prompts()
        settings = GenerationSettings(guidance_scale=GUIDANCE, num_inference_steps=STEPS, seed=0,
                                      num_images_per_prompt=SAMPLES_PER_PROMPT, batch_size=32)
        pipe = _load_toy()
        lora = str(out / positive) if positive else None
        if negative:
            attach_negative_guidance(pipe, negative=str(out / "selfnpo"), positive=lora, alpha=1.0, beta=1.0)
        elif lora:
            load_lora_into_pipeline(pipe, lora)
        settings.extra = {"model": "toy", "lora": lora, "negative_model": str(out / "selfnpo") if negative else None}
        generate_to_folder(pipe, heldout, folder, settings)
        return {"model": name, "images": len(heldout) * SAMPLES_PER_PROMPT}

    return run


def sample_stages(out: Path) -> list[Stage]:
    """One sampling stage per model (`samples/NAME`), each waiting only for the training stages it uses."""
    _, heldout = split_prompts()
    common = {"prompts": heldout, "per_prompt": SAMPLES_PER_PROMPT, "guidance": GUIDANCE, "steps": STEPS}
    stages = []
    for name, (positive, negative) in MODELS.items():
        needs = tuple(n for n in (positive, "selfnpo" if negative else None) if n)
        stages.append(Stage(f"samples/{name}", f"sampling held-out prompts with {name}",
                            {**common, "model": [positive, negative]}, _sample(out, name), needs, cost=0.5))
    return stages


def _keys(result, label: str) -> list[tuple]:
    return [result.records[i].key for i in result.rows_of(label)]


def paired_difference(result, reward: str, label: str, base: str):
    """Mean of (label - base) on the reward over images matched by prompt and seed, with its bootstrap CI."""
    from .evaluation.stats import paired_mean_difference

    return paired_mean_difference(result.scores_of(label, reward), _keys(result, label),
                                  result.scores_of(base, reward), _keys(result, base),
                                  result.bootstrap, result.seed, result.level)


def headlines(result) -> dict[str, dict]:
    """Per model: the effect it is for ("aim"), that effect measured with its 95% CI and the flips against its
    baseline ("measured"), and the same figures in two short lines for the overview picture ("short")."""
    fid = result.rewards[0]  # shape+colour correctness (REWARDS[0])

    def fidelity(label: str, base: str = "base") -> tuple[str, str]:
        d, wr = paired_difference(result, fid, label, base), result.win_rates[fid][(label, base)]
        short = (f"fidelity {result.means[fid][base].estimate:.1%} -> {result.means[fid][label].estimate:.1%} "
                 f"({100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}])")
        return short, (f"{short} points; of {wr.pairs} images on the same prompt and seed, {wr.wins} right that "
                       f"{base} got wrong, {wr.losses} wrong that it got right")

    def fd(diffs, label: str, base: str) -> str:
        d = diffs[(label, base)]
        return f"FD {d.fd.estimate:+.1f} [{d.fd.low:+.1f}, {d.fd.high:+.1f}] vs {base}"

    def row(aim: str, first: tuple[str, str], second: tuple[str, str]) -> dict:
        return {"aim": aim, "measured": f"{first[1]}; {second[1]}", "short": f"{first[0]}\n{second[0]}"}

    base = f"fidelity {result.means[fid]['base'].estimate:.1%}, FD {result.distribution['base'].fd.estimate:.0f}"
    rows = {"base": {"aim": "the reference point", "measured": base, "short": base}}
    for name in ("mapo", "dpo"):
        diff = fd(result.distribution_differences, name, "base")
        rows[name] = row("the judge's preference (shape and colour right) on unseen prompts", fidelity(name),
                         (diff, diff))
    diff = fd(result.distribution_differences, "base+selfnpo", "base")
    rows["base+selfnpo"] = row("quality (FD to ground truth, lower is better)", (diff, diff), fidelity("base+selfnpo"))
    diff = fd(result.distribution_differences, *VERSUS_TUNED)
    rows["mapo+selfnpo"] = row("quality of the tuned model", (diff, diff), fidelity(*VERSUS_TUNED))
    return rows


def _report(out: Path) -> Callable[[Path], dict]:
    def run(folder: Path) -> dict:
        import torch

        from .evaluation.evaluate import evaluate_folders
        from .evaluation.overview import matched_keys, overview_grid
        from .evaluation.report import format_table, write_report

        folders = {name: out / "samples" / name for name in MODELS}
        result = evaluate_folders(folders, list(REWARDS), folder, baseline="base", distribution=DISTRIBUTION,
                                  compare=[VERSUS_TUNED], processes=torch.get_num_threads())
        heads = headlines(result)
        keys = matched_keys(result, list(MODELS), limit=8, one_per_prompt=True)
        overview_grid(result, list(MODELS), keys, {m: h["short"] for m, h in heads.items()},
                      folder / "overview.png")
        write_report(result, folder, lead=("overview.png", "The same held-out prompts and seeds (columns) for every "
                                           "model (rows), with each model's headline figure (95% CIs)."))
        lines = ["| model | what it is for | measured on held-out prompts (95% CI) |", "|---|---|---|"]
        lines += [f"| {m} | {h['aim']} | {h['measured']} |" for m, h in heads.items()]
        (folder / "headlines.md").write_text("\n".join(lines) + "\n")
        (folder / "table.txt").write_text(format_table(result) + "\n")
        return {"report": str(result.report_path)}

    return run


def build_stages(out: Path, pairs_dir: Path | None = None) -> list[Stage]:
    pairs_dir = Path(pairs_dir) if pairs_dir is not None else toy_pairs_path()
    return [
        Stage("pairs", "judge-ranked pairs the toy model made of itself", {"pairs": _folder_digest(pairs_dir)},
              _use_pairs(pairs_dir)),
        Stage("mapo", "MaPO LoRA on the pairs", {**LORA, **TRAIN["mapo"]}, _train("mapo", pairs_dir), ("pairs",)),
        Stage("dpo", "Diffusion-DPO LoRA on the pairs", {**LORA, **TRAIN["dpo"]}, _train("dpo", pairs_dir), ("pairs",)),
        Stage("selfnpo", "Self-NPO negative LoRA from prompts only", {**LORA, **TRAIN["selfnpo"]}, _train("selfnpo", None),
              cost=1.5),  # the walk from noise: 1.7-2x a MaPO or DPO stage (benchmarks/RESULTS.md); starts first
        *sample_stages(out),
        Stage("report", "evaluation with the toy judge and the FD to ground truth, report.html",
              {"rewards": list(REWARDS), "distribution": DISTRIBUTION, "versus_tuned": VERSUS_TUNED}, _report(out),
              tuple(f"samples/{name}" for name in MODELS)),
    ]


def run_demo(out_dir: str | Path = "demo_out", pairs: str | Path | None = None, jobs: int | None = None,
             only: str | None = None, worker: bool = False) -> dict:
    """The demo; `only`: run that one stage here (`--only-stage`, for debugging); `worker`: be one of the
    demo's worker processes (`--worker`, see `run_worker`)."""
    from transformers.utils import logging as hf_logging

    # The toy pipeline has no image processor worth a warning ("requires torchvision"): keep the output readable.
    hf_logging.set_verbosity_error()
    out = ensure_writable_dir(out_dir)
    start = time.perf_counter()
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    if worker:
        run_worker(build_stages(out, pairs), out)
        return {"summaries": {}, "out": out, "seconds": time.perf_counter() - start}
    launch = [sys.executable, "-m", "diffalign", "demo", "--out", str(out),
              *(["--pairs", str(pairs)] if pairs is not None else []), "--worker"]
    summaries = run_stages(build_stages(out, pairs), out, jobs=jobs, launch=launch, only=only)
    if only is not None:
        return {"summaries": summaries, "out": out, "seconds": time.perf_counter() - start}
    total = time.perf_counter() - start
    table = (out / "report" / "table.txt").read_text()
    print("\n" + table)
    print((out / "report" / "headlines.md").read_text())
    print(f"held-out prompts x {SAMPLES_PER_PROMPT} seeds per model, guidance {GUIDANCE}, {STEPS} DDIM steps; "
          f"win rates against base on matched prompt and seed.")
    print(f"demo finished in {total / 60:.1f} min; report: {summaries['report']['report']}")
    return {"summaries": summaries, "out": out, "seconds": total}
