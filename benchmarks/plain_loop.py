"""Baseline: a plain LoRA Diffusion-DPO training step, written the way the single-file diffusers example
training scripts are, for `step_cost.py` to compare diffalign's step against at equal batch.

What makes it "plain" (each is what those scripts do, and what diffalign does differently):
- the VAE encodes both images of every pair on every step (diffalign: once, with the latent cache);
- the text encoder encodes every caption on every step (diffalign: once, with the cache);
- winner and loser go through the UNet in two separate calls (diffalign: one call on a batch of 2B);
- the reference is a separate frozen copy of the UNet, called twice more (diffalign LoRA: the same UNet
  with its adapters switched off, no copy);
- the loss and its logging are read back with `.item()` on every step.

The maths are the same as diffalign's (per-element mean squared error, the original Diffusion-DPO logit with
the 0.5, one t and one noise per pair), so the two steps do the same job.

Standalone: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/plain_loop.py [--model toy --batch 8 --steps 10]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class PlainDPO:
    """Load with `PlainDPO(path)`, add the trained parts with `prepare()`, then call `step(...)` per batch."""

    def __init__(self, pipeline_path: str):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(pipeline_path, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(pipeline_path, subfolder="text_encoder").requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(pipeline_path, subfolder="vae").requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(pipeline_path, subfolder="unet")
        self.scheduler = DDPMScheduler.from_pretrained(pipeline_path, subfolder="scheduler")
        self.text_encoder.eval()
        self.vae.eval()

    def prepare(self, rank: int = 8, lr: float = 1e-6, beta: float = 2000.0, seed: int = 0) -> "PlainDPO":
        from peft import LoraConfig

        self.beta = beta
        self.ref_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()  # the frozen reference copy
        self.unet.requires_grad_(False)
        torch.manual_seed(seed)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-2)
        return self

    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def step(self, pixels_w: torch.Tensor, pixels_l: torch.Tensor, captions: list[str], generator: torch.Generator) -> dict:
        """One optimizer step on B pairs (pixels in [-1, 1]); returns the scripts' usual logs as floats."""
        with torch.no_grad():
            scale = self.vae.config.scaling_factor
            latents_w = self.vae.encode(pixels_w).latent_dist.sample(generator) * scale
            latents_l = self.vae.encode(pixels_l).latent_dist.sample(generator) * scale
            encoder_hidden_states = self.encode_prompt(captions)
        noise = torch.randn(latents_w.shape, generator=generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents_w.shape[0],), generator=generator)
        noisy_w = self.scheduler.add_noise(latents_w, noise, t)
        noisy_l = self.scheduler.add_noise(latents_l, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target_w = self.scheduler.get_velocity(latents_w, noise, t)
            target_l = self.scheduler.get_velocity(latents_l, noise, t)
        else:
            target_w = target_l = noise

        def errors(unet):
            pred_w = unet(noisy_w, t, encoder_hidden_states).sample
            pred_l = unet(noisy_l, t, encoder_hidden_states).sample
            err_w = F.mse_loss(pred_w.float(), target_w.float(), reduction="none").mean(dim=[1, 2, 3])
            err_l = F.mse_loss(pred_l.float(), target_l.float(), reduction="none").mean(dim=[1, 2, 3])
            return err_w, err_l

        model_w, model_l = errors(self.unet)
        with torch.no_grad():
            ref_w, ref_l = errors(self.ref_unet)
        inside = -0.5 * self.beta * ((model_w - model_l) - (ref_w - ref_l))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "implicit_acc": (inside > 0).float().mean().item(),
                "model_diff": (model_w - model_l).mean().item(), "ref_diff": (ref_w - ref_l).mean().item()}


def main() -> None:
    from diffalign.toy.paths import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loop = PlainDPO(str(resolve_model(args.model))).prepare()
    size = loop.unet.config.sample_size * 2 ** (len(loop.vae.config.block_out_channels) - 1)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, args.batch, 3, size, size, generator=gen) * 2 - 1
    captions = ["a red circle"] * args.batch
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logs = loop.step(pixels[0], pixels[1], captions, gen)
        times.append(time.perf_counter() - t0)
    print(f"plain DPO step, batch {args.batch}: {sum(times[1:]) / max(1, len(times) - 1):.3f} s/step after one "
          f"warm-up step; last loss {logs['loss']:.4f}")


if __name__ == "__main__":
    main()
