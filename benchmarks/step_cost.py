"""Cost of one training step, measured side by side in one run: every method, pixels against the latent cache,
diffalign's step against a plain diffusers-style loop (plain_loop.py), on a tiny and a small UNet.

Configurations (LoRA rank 8 unless `full`, batch B pairs; SFT uses the B winners), per model:
- `dpo|mapo|sft pixels`: the loop's step with `use_cache: false`: items decoded and augmented, VAE- and
  text-encoded (`to_pair_batch`), noise and t, `backward_micro_batch`, `optimizer_step` (clip, NaN guard, AdamW);
- `dpo|mapo|sft cached`: the same from the latent/embedding cache (`diffalign cache`, built beforehand);
- `dpo|mapo cached full`: full fine-tune (DPO's reference a frozen copy of the UNet);
- `selfnpo`: data-free Self-NPO (prompts encoded every step, teacher K=5 on a 25-step grid, w = -1), its EMA update;
- `plain-dpo`: plain_loop.PlainDPO on the same decoded pixels (VAE + text encoder every step, winner and
  loser in separate UNet calls, a separate frozen reference copy);
- `--variants`: `dpo cached` with channels_last; `dpo cached` and `mapo cached` with `torch_compile: true` (the
  denoiser's repeated blocks compiled in place, as training does; compile time excluded, reported apart).
Models: `tiny` (the test suite's random-init tiny SD, 2 UNet levels) and `small` (the shipped toy SD, 4.1 M).

- Time: all configurations of a model live in this process; after warm-up they go round-robin (order rotated
  each round), so load drift hits all alike; ratios are per round, then the median.
- Peak memory (`--memory`): one fresh subprocess per configuration; peak resident set (VmHWM, reset through
  /proc/self/clear_refs after the model and data are loaded) minus the resident set at that point.
- Phases: where the time of `dpo pixels` / `dpo cached` goes (data, encode, forward, backward, optimizer).

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_cost.py [--quick] [--memory] [--variants]
(benchmarks/suite.py runs it with the others).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from importlib import import_module
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import PlainDPO  # noqa: E402

METHODS = ["dpo", "mapo", "sft"]
CONFIGS = [f"{m} {d}" for d in ("pixels", "cached") for m in METHODS] + ["selfnpo", "plain-dpo",
                                                                         "dpo cached full", "mapo cached full"]
VARIANTS = ["dpo cached+channels_last", "dpo cached+compile", "mapo cached+compile"]
#: plain_loop.PlainDPO's step time over the unmodified diffusers `train_diffusion_dpo.py` step's, measured side by
#: side (tiny SD1.5-style model, batch 4 pairs, LoRA rank 4, one pinned core, 7 interleaved repetitions; the
#: script is not part of this repository): the plain loop is about 7% slower, so a ratio to it understates our
#: cost against the script by that much. Rows against "the diffusers script" multiply by this.
PLAIN_LOOP_OVER_SCRIPT = 1.07
PROMPTS = ["a red circle", "a small blue square, striped", "a green triangle", "a large yellow diamond, outlined"]


def log(msg: str) -> None:
    print(f"[step_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ setup
def prepare_data(workdir: Path, pairs: int) -> dict:
    """Models on disk, a toy Pick-a-Pic parquet and one latent cache per model (built here, not timed)."""
    from diffalign.data import build_cache, load_pairs
    from diffalign.models import load_family
    from diffalign.toy.builders import save_tiny_pipelines
    from diffalign.toy.paths import toy_model_path
    from diffalign.toy.render_pairs import write_pairs_parquet

    models = {"tiny": str(save_tiny_pipelines(workdir / "tiny")["sd"]), "small": str(toy_model_path())}
    parquet = write_pairs_parquet(workdir / "pairs.parquet", pairs, kind="style", seed=0)
    for name, path in models.items():
        family = load_family(path)
        build_cache(load_pairs(str(parquet)), family, resolution=family.default_resolution,
                    cache_dir=workdir / f"cache-{name}", progress=False)
    return {"models": models, "parquet": str(parquet), "workdir": str(workdir)}


class Timer:
    """Phase timings of one step (enabled for the phase table only)."""

    def __init__(self):
        self.totals, self.last, self.on = defaultdict(float), 0.0, False

    def start(self):
        self.last = time.perf_counter()

    def mark(self, phase: str):
        if self.on:
            now = time.perf_counter()
            self.totals[phase] += now - self.last
            self.last = now


def _items(data: dict, model: str, res: int, path: str, family=None):
    """Dataset items as the loop reads them: decoded pixel pairs, or the model's latent cache."""
    from diffalign.data import PairTransform, fingerprint, load_pairs, open_cache
    from diffalign.training.batches import CachedItems, PixelPairs

    pairs = load_pairs(data["parquet"])
    if path == "cached":
        cache_dir = Path(data["workdir"]) / f"cache-{model}"
        return CachedItems(open_cache(cache_dir, fingerprint(pairs, family, resolution=res)))
    return PixelPairs(pairs, PairTransform(res, random_flip=False, center_crop=True), seed=0)


def make_step(config: str, model: str, data: dict, batch: int, accelerator, timer: Timer | None = None):
    """(step function, UNets it calls) for one configuration; the model is loaded fresh."""
    from diffalign.models import load_family
    from diffalign.training.batches import BatchStream, to_pair_batch
    from diffalign.training.recipes import PreferenceRecipe
    from diffalign.training.reference import AdaptersOff, FrozenCopy
    from diffalign.training.steps import backward_micro_batch, optimizer_step
    from diffalign.training.timesteps import UniformTimesteps, sample_noise_and_t

    timer = timer or Timer()
    path = data["models"][model]
    gen = torch.Generator().manual_seed(1)
    counter = iter(range(10**9))
    if config == "plain-dpo":
        plain = PlainDPO(path).prepare()
        res = plain.unet.config.sample_size * 2 ** (len(plain.vae.config.block_out_channels) - 1)
        stream = BatchStream(_items(data, model, res, "pixels"), batch, seed=0)

        def plain_step():
            items = stream.get(next(counter))
            stack = lambda key: torch.stack([it[key] for it in items])
            plain.step(stack("pixel_w"), stack("pixel_l"), [it["caption"] for it in items], gen)

        return plain_step, [plain.unet, plain.ref_unet]

    family = load_family(path)
    torch.manual_seed(0)
    ref_unet = None
    if config.endswith(" full"):  # full fine-tune: DPO's reference is a frozen copy of the base UNet
        ref_unet = import_module("copy").deepcopy(family.unet).requires_grad_(False).eval() if "dpo" in config else None
        family.enable_full_finetune()
    else:
        family.add_lora(8)
    family.unet.train()
    if "channels_last" in config:
        family.unet.to(memory_format=torch.channels_last)
    if "compile" in config:  # what `torch_compile: true` does in training
        from diffalign.training.compile import compile_repeated_blocks

        compile_repeated_blocks(family.unet)
    named = [p for p in family.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(named, lr=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raw_unet = family.unet
    unet, optimizer = accelerator.prepare(family.unet, optimizer)
    family.unet = unet

    if config == "selfnpo":
        from diffalign.training.selfnpo import EmaTeacher, SelfNPORecipe
        from diffalign.training.selfnpo_data import make_batch

        teacher = EmaTeacher(raw_unet, dict((n, p) for n, p in raw_unet.named_parameters() if p.requires_grad),
                             0.999, separate_copy=False)
        side = family.default_resolution // family.vae_scale_factor
        recipe = SelfNPORecipe(family, teacher, start="noise", guidance=-1.0,
                               latent_shape=(raw_unet.config.in_channels, side, side))
        with torch.no_grad():
            uncond1 = family.unconditional(1)

        def selfnpo_step():
            k = next(counter)
            with torch.no_grad():
                b = make_batch([{"caption": PROMPTS[(k + i) % len(PROMPTS)]} for i in range(batch)], family,
                               family.default_resolution, uncond1, with_latents=False)
            g = torch.Generator().manual_seed(k)
            sums = {}
            backward_micro_batch(accelerator, unet, lambda: recipe(b, g), micro=0, ga=1, sums=sums)
            optimizer_step(accelerator, named, optimizer, schedule, 1.0, sums)
            teacher.update()

        return selfnpo_step, [raw_unet]

    method, path = config.split()[0], config.split()[1].split("+")[0]
    stream = BatchStream(_items(data, model, family.default_resolution, path, family), batch, seed=0)
    reference = FrozenCopy(ref_unet) if ref_unet is not None else AdaptersOff(raw_unet)
    recipe = PreferenceRecipe(family, method, **({"beta": 2000.0} if method == "dpo" else {}), reference=reference)
    timesteps = UniformTimesteps(family.num_train_timesteps)

    def step():
        timer.start()
        items = stream.get(next(counter))
        timer.mark("data (decode, augment)")
        pair = to_pair_batch(items, family, family.default_resolution, accelerator.device)
        if "channels_last" in config:
            pair.latents_w = pair.latents_w.contiguous(memory_format=torch.channels_last)
            pair.latents_l = pair.latents_l.contiguous(memory_format=torch.channels_last)
        timer.mark("encode (VAE, text) / stack cached")
        noise, t = sample_noise_and_t(pair.latents_w.shape, timesteps, gen, accelerator.device)
        sums = {}
        backward_micro_batch(accelerator, unet, lambda: recipe(pair, noise, t), micro=0, ga=1, sums=sums)
        timer.mark("forward + backward + metrics")
        optimizer_step(accelerator, named, optimizer, schedule, 1.0, sums)
        timer.mark("clip + NaN guard + AdamW")

    return step, [raw_unet] + ([ref_unet] if ref_unet is not None else [])


def unet_calls(step, unets) -> int:
    from diffalign.training.recipes import count_unet_calls

    stack = [count_unet_calls(u) for u in unets]
    counters = [c.__enter__() for c in stack]
    try:
        step()
    finally:
        for c in stack:
            c.__exit__(None, None, None)
    return sum(c["calls"] for c in counters)


# ------------------------------------------------------------------------------------------------- time
def measure_time(args, data: dict, model: str, configs: list[str]) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    steps, calls, setup_s = {}, {}, {}
    for config in configs:
        log(f"{model}: setting up {config}")
        t0 = time.perf_counter()
        step, unets = make_step(config, model, data, args.batch, accelerator)
        step()  # first call: compile for the torch.compile variant
        setup_s[config] = time.perf_counter() - t0
        calls[config] = unet_calls(step, unets)
        for _ in range(args.warmup):
            step()
        steps[config] = step
    times = {c: [] for c in configs}
    for r in range(args.reps):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            t0 = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - t0)
        log(f"{model}: round {r + 1}/{args.reps} (load {os.getloadavg()[0]:.1f})")
    return {"times": times, "calls": calls, "setup_s": setup_s}


def measure_phases(args, data: dict, model: str) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    out = {}
    for config in ("dpo pixels", "dpo cached"):
        timer = Timer()
        step, _ = make_step(config, model, data, args.batch, accelerator, timer)
        step()
        timer.on = True
        n = max(2, args.reps // 2)
        for _ in range(n):
            step()
        out[config] = {k: v / n for k, v in timer.totals.items()}
    return out


# ----------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_worker(args) -> None:
    """Subprocess: peak RSS increase of one configuration over the loaded-process baseline (prints RESULT)."""
    import gc

    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    model, config = args.memory_worker.split(":", 1)
    data = json.loads(args.data)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    from diffalign.models import load_family

    warm = load_family(data["models"][model])  # imports and allocator warm-up, not any configuration's cost
    del warm
    gc.collect()
    baseline = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    step, _ = make_step(config, model, data, args.batch, accelerator)
    for _ in range(args.memory_steps):
        step()
    import resource

    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps({"delta_mb": (peak - baseline) / 1024, "exact": exact}), flush=True)


def measure_memory(args, data: dict, model: str, configs: list[str]) -> dict:
    out = {}
    for config in configs:
        log(f"{model}: memory of {config} (fresh subprocess)")
        cmd = [sys.executable, __file__, "--memory-worker", f"{model}:{config}", "--data", json.dumps(data),
               "--batch", str(args.batch), "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"memory worker {model}:{config} failed:\n{proc.stderr[-3000:]}")
        out[config] = json.loads(line[len("RESULT "):])
    return out


# ----------------------------------------------------------------------------------------------- report
def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b): both measured in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def target_rows(results: dict) -> list[tuple[str, float, float, str]]:
    """(claim, measured, limit, model) for the targets this benchmark checks."""
    rows = []
    for model, res in results.items():
        t = res["times"]
        rows.append((f"MaPO step / DPO step (cached, LoRA, {model})", ratio(t, "mapo cached", "dpo cached"), 0.75, model))
        rows.append((f"MaPO step / DPO step (cached, full fine-tune, {model})",
                     ratio(t, "mapo cached full", "dpo cached full"), 0.75, model))
        rows.append((f"cached / uncached DPO step ({model})", ratio(t, "dpo cached", "dpo pixels"), 1.0, model))
        rows.append((f"our DPO step / plain-loop DPO step, same pixels ({model})", ratio(t, "dpo pixels", "plain-dpo"),
                     1.0, model))
        # Against the diffusers script users run: with user defaults (use_cache: auto) a local dataset trains from
        # the cache; the plain loop's time is converted to the script's (PLAIN_LOOP_OVER_SCRIPT).
        rows.append((f"our DPO step, user defaults (cached) / diffusers DPO script step, est. ({model})",
                     ratio(t, "dpo cached", "plain-dpo") * PLAIN_LOOP_OVER_SCRIPT, 0.75, model))
        rows.append((f"our MaPO step, user defaults (cached) / diffusers DPO script step, est. ({model})",
                     ratio(t, "mapo cached", "plain-dpo") * PLAIN_LOOP_OVER_SCRIPT, 0.5, model))
        for method in ("dpo", "mapo"):
            if f"{method} cached+compile" in t:
                rows.append((f"compiled / eager {method.upper()} step (cached, torch_compile, {model})",
                             ratio(t, f"{method} cached+compile", f"{method} cached"), 0.8, model))
    return rows


def report(args, results: dict, memory: dict, phases: dict) -> str:
    lines = [f"Batch {args.batch} pairs, LoRA rank 8, {args.reps} rounds after {args.warmup} warm-up step(s), "
             f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s)."]
    for model, res in results.items():
        t, mem = res["times"], memory.get(model, {})
        lines += ["", f"**{model}** UNet:", "",
                  "| configuration | UNet calls/step | s/step median | vs dpo pixels | vs plain-dpo | peak RSS +MB |",
                  "|---|---|---|---|---|---|"]
        for c in t:
            m = "-" if c not in mem else f"{mem[c]['delta_mb']:.0f}"
            lines.append(f"| {c} | {res['calls'][c]} | {statistics.median(t[c]):.3f} | {ratio(t, c, 'dpo pixels'):.2f}x "
                         f"| {ratio(t, c, 'plain-dpo'):.2f}x | {m} |")
        compiled = [c for c in t if "compile" in c]
        if compiled:
            shown = ", ".join(f"{c} {res['setup_s'][c]:.0f} s" for c in compiled)
            lines.append(f"(torch_compile: set-up and first step, compilation included: {shown})")
    for model, ph in phases.items():
        lines += ["", f"Where a DPO step goes ({model}, s/step):", "", "| phase | pixels | cached |", "|---|---|---|"]
        for k in ph["dpo pixels"]:
            lines.append(f"| {k} | {ph['dpo pixels'][k]:.4f} | {ph['dpo cached'].get(k, 0.0):.4f} |")
    return "\n".join(lines)


def run(args) -> tuple[str, list]:
    torch.set_num_threads(args.threads)
    models = [m for m in ("tiny", "small") if m in args.models.split(",")]
    with_variants = lambda m: CONFIGS + (VARIANTS if args.variants and m in args.variant_models.split(",") else [])
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        log("building models, data and latent caches")
        data = prepare_data(Path(tmp), args.pairs)
        results = {m: measure_time(args, data, m, with_variants(m)) for m in models}
        phases = {m: measure_phases(args, data, m) for m in models[-1:]}
        memory = ({m: measure_memory(args, data, m, CONFIGS) for m in models if m in args.memory_models.split(",")}
                  if args.memory else {})
    return report(args, results, memory, phases), target_rows(results)


def add_args(p: argparse.ArgumentParser, quick: bool = False) -> None:
    p.add_argument("--batch", type=int, default=4 if quick else 8, help="pairs per step")
    p.add_argument("--reps", type=int, default=4 if quick else 20, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=1 if quick else 3)
    p.add_argument("--pairs", type=int, default=48 if quick else 96, help="toy pairs in the parquet")
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a shared machine)")
    p.add_argument("--memory", action="store_true", help="also peak memory, one subprocess per configuration")
    p.add_argument("--memory-steps", type=int, default=2 if quick else 4)
    p.add_argument("--memory-models", default="tiny,small", help="models whose configurations get a memory subprocess")
    p.add_argument("--variants", action="store_true",
                   help="also `dpo cached` with channels_last, `dpo|mapo cached` with torch_compile")
    p.add_argument("--variant-models", default="small", help="models the variants run on")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and a smaller batch (rough figures)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    quick = "--quick" in sys.argv
    add_args(p, quick)
    args = p.parse_args()
    if args.memory_worker:
        return memory_worker(args)
    text, targets = run(args)
    print(text)
    for claim, v, lim, _ in targets:  # a limit of 1.00x means "faster than": it must be beaten
        ok = v < lim if lim == 1.0 else v <= lim
        print(f"{'PASS' if ok else 'MISS'}  {claim}: {v:.2f}x (target {'<' if lim == 1.0 else '<='} {lim:.2f}x)")


if __name__ == "__main__":
    main()
