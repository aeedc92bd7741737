"""The toy judge: a small CNN that reads a 32x32 toy image and names its shape, colour, style and size.

It plays the part PickScore/HPS play for real models (docs/toy_world.md#the-judge-the-reward-toy): `ToyReward` in
`diffalign.rewards.toy` turns its probabilities into a prompt-fidelity score. It is trained on fresh
ground-truth renders with light augmentation (noise, blur, colour jitter) so generated images, which are
never as clean as renders, are read reliably; optionally a share of each batch first goes through a
pipeline's VAE (encode, decode), the best a generated image can look.

Files: `judge.safetensors` (weights) and `config.json` (architecture, vocabularies, training summary).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .render import RESOLUTION, render, to_tensor
from .world import COLOUR_NAMES, SHAPES, SIZES, STYLES, sample_scenes

DEFAULT_JUDGE_DIR = Path(__file__).parent / "assets" / "judge"
WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "config.json"
ATTRIBUTES = ("shape", "colour", "style", "size")
VOCABS = {"shape": SHAPES, "colour": COLOUR_NAMES, "style": STYLES, "size": SIZES}

# Training and evaluation draw from independent random streams whatever the seed: numpy's SeedSequence
# treats [seed, tag] as one entropy pool, so different tags never share a stream.
_TRAIN_TAG, _EVAL_TAG = 0x7A11, 0xE7A1
_UNIFORM_STYLES = (1.0, 1.0, 1.0)
# ~2 minutes on one busy core, ~1 minute on two idle ones; clean held-out accuracy saturates near 100%.
DEFAULT_STEPS = 300


@dataclass(frozen=True)
class JudgeArch:
    """Five 3x3 conv layers (BatchNorm, ReLU); `strides` halve the resolution; global avg+max pooling."""

    channels: tuple[int, ...] = (32, 32, 64, 64, 128)
    strides: tuple[int, ...] = (1, 2, 1, 2, 1)
    resolution: int = RESOLUTION


class ToyJudge(nn.Module):
    """Input: float (N, 3, 32, 32) in [-1, 1]. Output of `forward`: logits per attribute."""

    def __init__(self, arch: JudgeArch = JudgeArch(), vocabs: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.arch = arch
        self.vocabs = {k: tuple(v) for k, v in (vocabs or VOCABS).items()}
        layers, c_in = [], 3
        for c_out, stride in zip(arch.channels, arch.strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        # Average pooling sees colour and area; max pooling sees the strongest local cue (a corner, a stripe).
        self.heads = nn.ModuleDict({k: nn.Linear(2 * c_in, len(v)) for k, v in self.vocabs.items()})

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation every head reads: (N, 2 * channels[-1]), the conv features'
        spatial mean followed by their spatial max."""
        h = self.features(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.pool(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def pooled_features(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """`pool` of each image as float CPU rows (N, 2 * channels[-1]), in eval mode and in batches: the
        feature space of the toy's distribution measures (`diffalign.evaluation.toy_distribution`)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        parts = [self.pool(x[i : i + batch_size].to(device).float()).float().cpu()
                 for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, 2 * self.arch.channels[-1])

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Softmax probabilities per attribute, (N, len(vocab)), computed in eval mode and in batches."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        parts = [
            {k: v.softmax(-1).float().cpu() for k, v in self(x[i : i + batch_size].to(device).float()).items()}
            for i in range(0, len(x), batch_size)
        ]
        self.train(was_training)
        if not parts:
            return {k: torch.zeros(0, len(v)) for k, v in self.vocabs.items()}
        return {k: torch.cat([p[k] for p in parts]) for k in self.vocabs}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------- data


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in VOCABS.items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light corruption in [-1, 1] space: colour jitter, blur on a share of images, gaussian noise.

    Kept well below the gaps between the world's colours (the closest pair, yellow/orange, differ by 0.29
    in green on a 0..1 scale) so no label becomes wrong.
    """
    n = len(x)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    gain = 1 + 0.08 * (rand(n, 1, 1, 1) - 0.5) * 2  # contrast around 0
    shift = 0.06 * (rand(n, 3, 1, 1) - 0.5) * 2  # per channel
    x = x * gain + shift
    blur = rand(n) < 0.3
    if blur.any():
        sigma = 0.4 + 0.5 * float(rand(1))
        k = torch.exp(-0.5 * (torch.arange(-1, 2, dtype=torch.float32) / sigma) ** 2)
        k = (k[:, None] * k[None, :]) / k.sum() ** 2
        xb = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
        x = x.clone()
        x[blur] = xb
    x = x + 0.06 * rand(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def _load_vae(vae_path: str | Path):
    from diffusers import AutoencoderKL

    folder = Path(vae_path)
    sub = folder / "vae"
    if not (sub / "config.json").is_file():
        if (folder / "config.json").is_file():  # a bare AutoencoderKL folder is fine too
            sub = folder
        else:
            raise UserError(f"no VAE at '{folder}': expected a StableDiffusionPipeline folder with a 'vae' subfolder")
    return AutoencoderKL.from_pretrained(sub).eval().requires_grad_(False)


@torch.no_grad()
def vae_round_trip(vae, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode and decode (posterior mean): what the VAE can give back of a clean image, in [-1, 1]."""
    out = [
        vae.decode(vae.encode(x[i : i + batch_size]).latent_dist.mode()).sample.clamp(-1, 1)
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else x


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_judge(judge: ToyJudge, n: int = 2000, seed: int = 0, vae=None, style_prior=_UNIFORM_STYLES) -> dict[str, float]:
    """Held-out accuracies on `n` fresh renders (styles uniform by default), from a random stream disjoint
    from training's. With `vae` (an AutoencoderKL) the renders go through its round trip first.

    Returns shape, colour, shape_and_colour, style, size, all in [0, 1].
    """
    rng = np.random.default_rng([seed, _EVAL_TAG])
    scenes = sample_scenes(n, rng, style_prior=style_prior)
    x = to_tensor(render(scenes, rng))
    if vae is not None:
        x = vae_round_trip(vae, x)
    probs = judge.probabilities(x)
    labels = _labels(scenes)
    hit = {k: (probs[k].argmax(-1) == labels[k]) for k in ATTRIBUTES}
    acc = {k: hit[k].float().mean().item() for k in ATTRIBUTES}
    return {
        "shape": acc["shape"],
        "colour": acc["colour"],
        "shape_and_colour": (hit["shape"] & hit["colour"]).float().mean().item(),
        "style": acc["style"],
        "size": acc["size"],
    }


# ----------------------------------------------------------------------------------------------- training


@dataclass
class JudgeTrainSummary:
    steps: int
    batch_size: int
    seed: int
    lr: float
    vae_path: str | None
    vae_share: float
    seconds: float
    threads: int
    num_parameters: int
    final_loss: float
    heldout_n: int
    heldout_clean: dict = field(default_factory=dict)
    heldout_vae: dict | None = None


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_judge(
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    vae_path: str | Path | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    vae_share: float = 1 / 3,
    heldout_n: int = 2000,
    threads: int = 0,
) -> Path:
    """Train the judge on fresh renders and save `judge.safetensors` + `config.json` into `out_dir`.

    Styles are drawn uniformly (the world's prior rarely shows outlined/striped). With `vae_path` (a
    StableDiffusionPipeline folder), `vae_share` of each batch goes through its VAE round trip first.
    `threads` > 0 sets torch's intra-op threads for the run. Returns `out_dir`.
    """
    from safetensors.torch import save_file

    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    out_dir = Path(out_dir)
    old_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng([seed, _TRAIN_TAG])
        vae = _load_vae(vae_path) if vae_path is not None else None
        judge = ToyJudge()
        opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
        n_vae = int(round(batch_size * vae_share)) if vae is not None else 0
        warmup = min(50, max(1, steps // 10))
        judge.train()
        start, loss_avg = time.perf_counter(), float("nan")
        bar = tqdm(range(steps), desc="judge", unit="step")
        for step in bar:
            scenes = sample_scenes(batch_size, rng, style_prior=_UNIFORM_STYLES)
            x = to_tensor(render(scenes, rng))
            if n_vae:
                x[:n_vae] = vae_round_trip(vae, x[:n_vae])
            x = _augment(x, gen)
            labels = _labels(scenes)
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(step, steps, warmup)
            logits = judge(x)
            loss = sum(F.cross_entropy(logits[k], labels[k]) for k in ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_avg = loss.item() if step == 0 else 0.95 * loss_avg + 0.05 * loss.item()
            bar.set_postfix(loss=f"{loss_avg:.3f}")
        seconds = time.perf_counter() - start
        judge.eval()
        summary = JudgeTrainSummary(
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            lr=lr,
            vae_path=str(vae_path) if vae_path is not None else None,
            vae_share=vae_share if vae is not None else 0.0,
            seconds=round(seconds, 1),
            threads=torch.get_num_threads(),
            num_parameters=judge.num_parameters,
            final_loss=round(loss_avg, 4),
            heldout_n=heldout_n,
            heldout_clean=_rounded(evaluate_judge(judge, heldout_n, seed)),
            heldout_vae=_rounded(evaluate_judge(judge, heldout_n, seed, vae=vae)) if vae is not None else None,
        )
    finally:
        torch.set_num_threads(old_threads)

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "model_type": "diffalign-toy-judge",
        "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(judge.arch).items()},
        "vocabs": {k: list(v) for k, v in judge.vocabs.items()},
        "input": "float (N, 3, 32, 32) in [-1, 1]",
        "training": asdict(summary),
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


# -------------------------------------------------------------------------------------------------- loading


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> ToyJudge:
    """Load a judge folder (default: the one shipped in the package), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DEFAULT_JUDGE_DIR
    weights, config_file = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights.is_file() or not config_file.is_file():
        raise UserError(
            f"no toy judge at '{folder}' (expected {WEIGHTS_NAME} and {CONFIG_NAME}): "
            f"run `diffalign toy train-judge --out {folder}`"
        )
    config = json.loads(config_file.read_text())
    arch_cfg = config.get("architecture", {})
    arch = JudgeArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch_cfg.items()})
    judge = ToyJudge(arch, {k: tuple(v) for k, v in config["vocabs"].items()})
    judge.load_state_dict(load_file(str(weights)))
    judge.training_summary = config.get("training", {})
    return judge.to(device).eval()
