"""One training step of the real architectures (SD1.5, SDXL, CogVideoX) at random init and reduced size, on the CPU,
with the peak memory of each component; the planner's prediction beside it (`diffalign plan`, planning/).

No weights are downloaded: every module is built from the shipped config.json files (planning/architectures/).
Each configuration runs in a fresh subprocess (`--one`), so its peak is its own:

    taskset -c 0 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_shapes.py \
        [--only sd15-lora-dpo,...] [--out benchmarks/real_shapes.json]

How memory is measured (Linux): the process's resident set. Its high-water mark (VmHWM) is reset through
/proc/self/clear_refs before each phase and read after it; glibc's mmap threshold is fixed
(MALLOC_MMAP_THRESHOLD_=65536) so that freed tensors go back to the system and a phase's peak is not an earlier
phase's leftovers. Per component:

- weights by dtype: byte counts of the resident modules' parameters and buffers (each tensor once);
- gradients: byte counts of the `.grad` tensors after backward;
- optimizer state: byte counts of the optimizer's state tensors (the state is made first with one update from zero
  gradients, so the measured step is a steady-state step, as every step after the first);
- activations: the forward+backward high-water mark minus the resident set before the forward, minus the gradients
  (what the step holds beyond weights, state and gradients: saved activations and the largest transient);
- runtime: the resident set after `import torch, diffusers, transformers, peft, accelerate` (libraries, no model).

Why float32 and no autocast: this CPU (AVX2, no native bf16) runs a bf16 SD1.5 UNet forward at 256 px in 345 s
against 6.2 s in float32 (measured), so the steps here run in float32 (mixed_precision: no); the planner is checked
at that precision. What changes in bf16 (frozen weights 2 bytes, autocast's copies of trained weights, activations)
is the planner's arithmetic, not measured here.

Reductions, every one printed with the row: SD1.5 and SDXL at 256 px (latents 32x32), CogVideoX-2b 5 frames at
128x128 (2 latent frames of 16x16); one pair (two rows) a step; LoRA rank 8 on to_q/k/v/out.0. The text encoders
encode the batch once and are dropped before the step (a user whose prompt embeddings are cached; T5-XXL is built
with 2 of its 24 layers for that encoding, so its output has the real shape but it is not the real encoder); the VAE
encodes the batch's pixels once (the latent cache at these shapes) and is dropped for SDXL and CogVideoX (kept
for SD1.5, as `diffalign train` keeps it). Full fine-tuning (SD1.5 only, where it fits in this machine's share of
memory) uses Adafactor: AdamW's two float32 moments (6.9 GB for the SD1.5 UNet) would pass the 12 GB a process may
use here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> settings. method, train_mode, checkpointing, arch, resolution, frames, resident (kept during the step)
CONFIGS = {
    "sd15-lora-mapo": dict(arch="sd15", method="mapo", train_mode="lora", gc=False),
    "sd15-lora-mapo-gc": dict(arch="sd15", method="mapo", train_mode="lora", gc=True),
    "sd15-lora-dpo": dict(arch="sd15", method="dpo", train_mode="lora", gc=False),
    "sd15-lora-dpo-gc": dict(arch="sd15", method="dpo", train_mode="lora", gc=True),
    "sd15-lora-mapo-512": dict(arch="sd15", method="mapo", train_mode="lora", gc=False, resolution=512),  # size check
    "sd15-lora-npo": dict(arch="sd15", method="npo", train_mode="lora", gc=False),
    "sd15-lora-sft": dict(arch="sd15", method="sft", train_mode="lora", gc=False),
    "sd15-lora-selfnpo": dict(arch="sd15", method="selfnpo", train_mode="lora", gc=False),
    "sd15-full-mapo": dict(arch="sd15", method="mapo", train_mode="full", gc=False, optimizer="adafactor"),
    "sd15-full-mapo-gc": dict(arch="sd15", method="mapo", train_mode="full", gc=True, optimizer="adafactor"),
    "sdxl-lora-mapo": dict(arch="sdxl", method="mapo", train_mode="lora", gc=False),
    "sdxl-lora-mapo-gc": dict(arch="sdxl", method="mapo", train_mode="lora", gc=True),
    "sdxl-lora-dpo-gc": dict(arch="sdxl", method="dpo", train_mode="lora", gc=True),
    "sdxl-lora-selfnpo-gc": dict(arch="sdxl", method="selfnpo", train_mode="lora", gc=True),
    "sdxl-lora-sft-gc": dict(arch="sdxl", method="sft", train_mode="lora", gc=True),
    "sdxl-lora-npo-gc": dict(arch="sdxl", method="npo", train_mode="lora", gc=True),
    "cogvideox-2b-lora-selfnpo-gc": dict(arch="cogvideox-2b", method="selfnpo", train_mode="lora", gc=True),
    "cogvideox-2b-lora-mapo": dict(arch="cogvideox-2b", method="mapo", train_mode="lora", gc=False),
    "cogvideox-2b-lora-mapo-gc": dict(arch="cogvideox-2b", method="mapo", train_mode="lora", gc=True),
    "cogvideox-2b-lora-mapo-gc-9f": dict(arch="cogvideox-2b", method="mapo", train_mode="lora", gc=True, frames=9,
                                         resolution=192),  # size check: 3 latent frames of 24x24
    "cogvideox-2b-lora-dpo-gc": dict(arch="cogvideox-2b", method="dpo", train_mode="lora", gc=True),
}
DEFAULTS = dict(sd15=dict(resolution=256, frames=None, keep_vae=True), sdxl=dict(resolution=256, frames=None, keep_vae=False),
                **{"cogvideox-2b": dict(resolution=128, frames=5, keep_vae=False)})


# ------------------------------------------------------------------------------------------- memory helpers
def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set (Linux >= 4.0)
        f.write("5")


def peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tensor_bytes(tensors) -> dict:
    out, seen = {}, set()
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        name = str(t.dtype).replace("torch.", "")
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def module_tensors(*modules):
    for m in modules:
        if m is None:
            continue
        yield from m.parameters()
        yield from m.buffers()


# ---------------------------------------------------------------------------------------------- one config
def run_one(name: str, settings: dict) -> dict:
    import torch

    torch.manual_seed(0)
    import accelerate  # noqa: F401  (the runtime baseline counts the libraries a run imports)
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from diffalign.planning.architectures import architecture, build

    gc.collect()
    runtime = rss()
    arch = architecture(settings["arch"])
    res, frames = settings["resolution"], settings["frames"]
    batch = 1  # pairs
    record = dict(name=name, **settings, batch_pairs=batch, runtime_bytes=runtime, phases={})
    times = {}

    # 1. prompts: encode once, drop the encoders (cached embeddings)
    reset_peak()
    t0 = time.time()
    n = 2 * batch
    cond = encode_prompts(arch, n, res, torch)
    gc.collect()
    record["phases"]["encode_prompts"] = peak()
    times["encode_prompts"] = time.time() - t0

    # 2. pixels -> latents through the real VAE (the latent cache's work at these shapes)
    reset_peak()
    t0 = time.time()
    vae = build(arch.vae, device="cpu")
    if arch.family == "cogvideox":
        pixels = torch.rand(n, 3, frames, res, res) * 2 - 1
    else:
        pixels = torch.rand(n, 3, res, res) * 2 - 1
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    if arch.family == "cogvideox":
        z = z.permute(0, 2, 1, 3, 4).contiguous()  # (B, F', C, H', W')
    latents = z.detach()
    del pixels, z
    if not settings["keep_vae"]:  # dropped: a meta-device stand-in keeps its config (scale factor), no memory
        del vae
        vae = build(arch.vae, device="meta")
    gc.collect()
    record["phases"]["vae_encode"] = peak()
    times["vae_encode"] = time.time() - t0
    record["latent_shape"] = list(latents.shape[1:])

    # 3. the denoiser, the family, the method's recipe, the optimizer (as the training loop builds them)
    t0 = time.time()
    denoiser = build(arch.denoiser, device="cpu")
    family = make_family(arch, denoiser, vae, torch)
    if arch.family == "cogvideox":
        family.num_frames = frames
    cfg = make_config(settings, res)
    from diffalign.training.loop import _prepare_network
    from diffalign.training.methods import get_method
    from diffalign.training.protocol import RunContext

    method = get_method(cfg.method)
    keys = method.keys(cfg)
    reference = _prepare_network(cfg, family, method.needs_reference(keys))
    named = {k: p for k, p in family.unet.named_parameters() if p.requires_grad}
    recipe = method.recipe(RunContext(cfg, method, keys, family, res, named, reference, torch.device("cpu"), (0, 1),
                                      print))
    step_batch = make_batch(cfg, family, latents, cond, batch, torch)
    params = list(named.values())
    optimizer = make_optimizer(settings, cfg, params, torch)
    for p in params:  # one update from zero gradients: the optimizer state exists, as at every step after the first
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["build"] = time.time() - t0

    # what is resident before the step
    teacher = getattr(recipe, "teacher", None)
    extra = [reference.module if reference is not None and getattr(reference, "module", None) is not None else None,
             teacher.module if teacher is not None and teacher.separate_copy else None]
    weights = tensor_bytes(module_tensors(family.unet, vae, *extra))
    if teacher is not None and not teacher.separate_copy:
        weights["float32 (teacher LoRA copy)"] = sum(w.numel() * 4 for w in teacher.weights.values())
    state = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    record["weights"] = weights
    record["optimizer_state"] = sum(state.values())
    record["trainable_parameters"] = sum(p.numel() for p in params)
    record["denoiser_parameters"] = sum(p.numel() for p in family.unet.parameters()) - \
        (record["trainable_parameters"] if cfg.train_mode == "lora" else 0)

    # 4. the step: forward + backward (the loop's backward_micro_batch without accelerate), then the update
    gc.collect()
    before = rss()
    reset_peak()
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    result = recipe.step(step_batch, gen)
    result.losses.mean().backward()
    times["forward_backward"] = time.time() - t0
    fwd_bwd_peak = peak()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    reset_peak()
    t0 = time.time()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    recipe.after_update()
    times["update"] = time.time() - t0
    update_peak = peak()
    record.update(rss_before_step=before, fwd_bwd_peak=fwd_bwd_peak, update_peak=update_peak, gradients=grads,
                  activations=max(0, fwd_bwd_peak - before - grads), step_peak=max(fwd_bwd_peak, update_peak),
                  loss=float(result.losses.mean()), seconds=times)
    record["other"] = before - runtime - sum(weights.values()) - record["optimizer_state"]
    if cfg.method == "mapo" and cfg.train_mode == "lora" and arch.family in ("sd", "sdxl"):
        record["guidance"] = guidance_call(family, latents, cond, torch)
    return record


def guidance_call(family, latents, cond, torch) -> dict:
    """One sampling call with negative-branch guidance (the trained LoRA as the negative model, fast path: one call
    for the CFG batch [negative half; positive half]) against one plain CFG call, at the step's shapes."""
    from diffalign.guidance.denoiser import BASE
    from diffalign.guidance.unet import NegativeGuidedUNet

    family.unet.eval()
    wrapper = NegativeGuidedUNet(family.unet, None, pos_adapter=BASE, neg_adapter="default")
    x = torch.randn((2, *latents.shape[1:]))
    t = torch.tensor([500, 500])
    out = {}
    for name, net in (("plain_cfg", family.unet), ("negative_guided", wrapper)):
        gc.collect()
        base = rss()
        reset_peak()
        t0 = time.time()
        with torch.no_grad():
            pred = family.predict(x, t, cond, net=net)
        out[name] = dict(seconds=time.time() - t0, peak_increase=peak() - base, shape=list(pred.shape))
    return out


def encode_prompts(arch, n: int, res: int, torch):
    """Random token ids through the real text encoders (T5-XXL: 2 of 24 layers), once; returns a Conditioning."""
    from diffalign.models import Conditioning
    from diffalign.planning.architectures import build

    def clip_ids():
        ids = torch.full((n, 77), 49407)
        ids[:, 0] = 49406
        ids[:, 1:20] = torch.randint(300, 40000, (n, 19))
        return ids

    with torch.no_grad():
        if arch.family == "sd":
            enc = build(arch.text_encoders[0], device="cpu")
            cond = Conditioning(prompt_embeds=enc(clip_ids())[0])
        elif arch.family == "sdxl":
            hidden, pooled = [], None
            for file in arch.text_encoders:
                enc = build(file, device="cpu")
                out = enc(clip_ids(), output_hidden_states=True)
                if out[0].ndim == 2:
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
                del enc, out
            time_ids = torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32)
            cond = Conditioning(prompt_embeds=torch.cat(hidden, -1), text_embeds=pooled, time_ids=time_ids)
        else:
            enc = build(arch.text_encoders[0], device="cpu", overrides={"num_layers": 2})
            ids = torch.randint(2, 32000, (n, 226))
            cond = Conditioning(prompt_embeds=enc(ids)[0])
    return cond.to("cpu", torch.float32)


def make_family(arch, denoiser, vae, torch):
    from diffalign.models.loading import family_class
    from diffalign.planning.architectures import scheduler

    noise = scheduler(arch)
    return family_class(arch.family)(unet=denoiser, vae=vae, noise_scheduler=noise, scheduler=noise, text_encoders=[],
                                     tokenizers=[])


def make_config(settings: dict, res: int):
    from diffalign.training.config import TrainConfig

    kw = dict(method=settings["method"], train_mode=settings["train_mode"],
              gradient_checkpointing=settings["gc"], resolution=res, rank=8, train_batch_size=1, mixed_precision="no")
    if settings["method"] == "dpo":  # the shipped recipes' beta (sd15_dpo.yaml; the memory does not depend on it)
        kw.update(beta=2000.0)
    if settings["method"] == "npo":  # sd15_npo.yaml: the DPO objective on swapped pairs (with the reference pass)
        kw.update(npo_objective="dpo", beta=1000.0)
    if settings["method"] == "selfnpo":  # images start, interior range: K + 1 = 6 teacher calls (a noise start walks 26)
        kw.update(selfnpo_start="images", selfnpo_start_range="interior")
    return TrainConfig(**kw)


def make_batch(cfg, family, latents, cond, batch: int, torch):
    if cfg.method == "selfnpo":
        from diffalign.training.selfnpo_data import SelfNPOBatch

        uncond = cond[slice(batch, 2 * batch)]
        return SelfNPOBatch(cond=cond[slice(0, batch)], uncond=uncond, latents=latents[:batch])
    from diffalign.training.batches import PairBatch

    return PairBatch(latents_w=latents[:batch], latents_l=latents[batch:2 * batch], cond_w=cond[slice(0, batch)],
                     cond_l=cond[slice(batch, 2 * batch)])


def make_optimizer(settings: dict, cfg, params, torch):
    if settings.get("optimizer") == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    from diffalign.training.steps import make_optimizer as loop_optimizer

    return loop_optimizer(cfg, params, 1)[0]


# -------------------------------------------------------------------------------------------------- driver
def settings_of(name: str) -> dict:
    s = dict(CONFIGS[name])
    return {**DEFAULTS[s["arch"]], "optimizer": "adamw", **s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "real_shapes.json"), help="JSON file the records are merged into")
    args = parser.parse_args(argv)
    if args.one:
        print("RECORD " + json.dumps(run_one(args.one, settings_of(args.one))), flush=True)
        return 0
    names = args.only.split(",") if args.only else list(CONFIGS)
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for name in names:
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", name], env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RECORD ")]
        if proc.returncode or not lines:
            print(f"{name}: FAILED ({proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        records[name] = json.loads(lines[-1][7:])
        out.write_text(json.dumps(records, indent=1))
        r = records[name]
        print(f"{name}: step peak {r['step_peak'] / 2**30:.2f} GiB, activations {r['activations'] / 2**30:.2f} GiB, "
              f"{time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
