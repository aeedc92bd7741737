"""`diffalign toy pretrain`: train the toy StableDiffusionPipeline on procedural renders, on CPU.

Two phases. The VAE learns to reconstruct renders (MSE plus a tiny KL); then a pool of renders is encoded
once and the UNet learns epsilon prediction on latents drawn from the pool's posteriors, with captions
re-drawn every step (attributes dropped, some empty) and the frozen random text encoder. The EMA UNet is
the one saved. Budgets are in steps so a run is reproducible; the defaults fit ~15 minutes on 2 cores.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .builders import TOY, build_sd_pipeline
from .pretrain_config import PretrainConfig
from .render import render, to_tensor
from .world import random_caption, sample_scenes

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_vae(vae, cfg: PretrainConfig, rng: np.random.Generator, log) -> float:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.vae_steps), desc="VAE", unit="step")
    psnr = float("nan")
    for step in bar:
        x = to_tensor(render(sample_scenes(cfg.vae_batch_size, rng), rng))
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _cosine_with_warmup(step, cfg.vae_steps, 50)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        # PSNR on the [0, 1] scale (the [-1, 1] MSE is 4x larger)
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
        bar.set_postfix(psnr=f"{psnr:.1f}dB")
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log({"phase": "vae", "step": step, "mse": mse.item(), "psnr_db": psnr})
    vae.eval()
    return psnr


@torch.no_grad()
def encode_pool(vae, cfg: PretrainConfig, rng: np.random.Generator):
    """Render and encode a pool once: posterior means/stds and the scenes they came from."""
    scenes = sample_scenes(cfg.pool_size, rng)
    means, stds = [], []
    for i in tqdm(range(0, len(scenes), 500), desc="encode pool", unit="chunk"):
        dist = vae.encode(to_tensor(render(scenes[i : i + 500], rng))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), scenes


def train_unet(pipe: DiffusionPipeline, pool, cfg: PretrainConfig, rng: np.random.Generator, log):
    means, stds, scenes = pool
    unet, text_encoder, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    scaling = pipe.vae.config.scaling_factor
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=cfg.unet_weight_decay)
    alphas_cumprod = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.unet_steps), desc="UNet", unit="step")
    running = None
    t0 = time.time()
    for step in bar:
        idx = torch.from_numpy(rng.integers(len(scenes), size=cfg.unet_batch_size))
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        captions = [random_caption(scenes[i], rng) for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            cond = text_encoder(ids)[0]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * x0 + s * noise, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _cosine_with_warmup(step, cfg.unet_steps, cfg.unet_warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log({"phase": "unet", "step": step, "loss": running, "elapsed_s": round(time.time() - t0, 1)})
    return ema.eval()


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [diffalign, toy]
---
# diffalign toy Stable Diffusion

A tiny but standard `StableDiffusionPipeline` of the diffalign toy world: 32x32 images of one shape
(circle, square, triangle, diamond) of a colour (red, green, blue, yellow, purple, orange), small or large,
plain, outlined or striped. Prompts look like `a small green diamond, striped`.

Trained by `diffalign toy pretrain` on CPU ({minutes:.1f} minutes): VAE {vae_steps} steps (PSNR {psnr:.1f} dB),
UNet {unet_steps} steps (EMA, batch {unet_batch}), epsilon prediction, frozen random CLIP text encoder, offline tokenizer.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{path}")  # the shipped copy: `diffalign toy path`
image = pipe("a red circle", height=32, width=32, num_inference_steps=20, guidance_scale=7.5).images[0]
```
"""


def pretrain(cfg: PretrainConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log_path = out / "pretrain_log.jsonl"
    log_file = log_path.open("w")

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    rng = np.random.default_rng(cfg.seed)
    pipe = build_sd_pipeline(TOY, seed=cfg.seed)
    pipe.text_encoder.requires_grad_(False)
    psnr = train_vae(pipe.vae, cfg, rng, log)
    pool = encode_pool(pipe.vae, cfg, rng)
    # Latents of unit variance, as SD's scaling factor does for its VAE.
    scaling = float(1.0 / pool[0].add(pool[1] * torch.randn_like(pool[1])).std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    log({"phase": "pool", "scaling_factor": scaling})
    pipe.unet = train_unet(pipe, pool, cfg, rng, log)
    pipe.save_pretrained(out)
    minutes = (time.time() - start) / 60
    summary = {**asdict(cfg), "minutes": round(minutes, 2), "vae_psnr_db": round(psnr, 2), "scaling_factor": scaling}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "README.md").write_text(
        MODEL_CARD.format(minutes=minutes, vae_steps=cfg.vae_steps, psnr=psnr, unet_steps=cfg.unet_steps,
                          unet_batch=cfg.unet_batch_size, path=out.name)
    )
    log_file.close()
    return out
