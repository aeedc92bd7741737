"""CLIP-based rewards: PickScore, CLIP score and the LAION aesthetic predictor.

All three load a `transformers.CLIPModel` and its processor from a hub id or a local folder (as
`from_pretrained` reads them), embed images and prompts in batches under `torch.no_grad`, and return one
float per image.

- `pickscore` (Kirstain et al. 2023, Pick-a-Pic): `logit_scale.exp() * cos(image, text)`, the logit the
  model was trained with (about 20..23 for real images with PickScore_v1).
- `clip` (Hessel et al. 2021, CLIPScore): `100 * max(cos(image, text), 0)` (the 100 scale as in common
  implementations; the paper's w = 2.5 differs only by a constant factor).
- `aesthetic` (LAION improved-aesthetic-predictor): an MLP head on the L2-normalised CLIP ViT-L/14 image
  embedding, about 1..10. The prompt is not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Reward, check_prompts, images_to_pil
from .registry import register_reward

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
_HEAD_SUFFIXES = (".safetensors", ".pth", ".pt")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _features(output) -> torch.Tensor:
    """transformers 5 returns an output object (projected embedding in `pooler_output`); older ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """A CLIPModel and its processor; embeds images and prompts (projected, not normalised) in batches."""

    def __init__(self, model_path: str, processor_path: str | None = None, device=None, batch_size: int = 32,
                 what: str = "CLIP reward", need_text: bool = True):
        from transformers import AutoProcessor, CLIPImageProcessor, CLIPModel

        self.device = torch.device(device) if device is not None else _default_device()
        self.batch_size = batch_size
        processor_path = processor_path or model_path
        hint = "pass a local folder or a hub id (downloads need network access and HF_HUB_OFFLINE unset)"
        try:
            self.model = CLIPModel.from_pretrained(model_path).eval().to(self.device)
        except (OSError, ValueError) as exc:
            raise UserError(f"{what}: cannot load a CLIP model from '{model_path}' ({_first_line(exc)}); {hint}") from None
        try:
            if need_text:
                processor = AutoProcessor.from_pretrained(processor_path)
                self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
            else:
                self.image_processor, self.tokenizer = CLIPImageProcessor.from_pretrained(processor_path), None
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"{what}: cannot load a CLIP processor from '{processor_path}' ({_first_line(exc)}); "
                            f"{hint}, or name the processor with ':processor=PATH'") from None
        text_config = self.model.config.text_config
        limit = getattr(self.tokenizer, "model_max_length", None) or text_config.max_position_embeddings
        # Truncate to what both the tokenizer and the position table allow (77 for real CLIP).
        self.max_length = min(int(limit), int(text_config.max_position_embeddings))

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pils = images_to_pil(images)
        out = []
        for start in range(0, len(pils), self.batch_size):
            pixels = self.image_processor(images=pils[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, dtype=self.model.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start : start + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            out.append(_features(self.model.get_text_features(**tokens)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def cosine(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """cos(image_i, prompt_i) per image. Each distinct prompt is embedded once."""
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        text = F.normalize(self.text_embeddings(list(position)), dim=-1)
        rows = torch.tensor([position[p] for p in prompts], dtype=torch.long)
        image = F.normalize(self.image_embeddings(images), dim=-1)
        return (image * text[rows]).sum(-1)


class PickScoreReward(Reward):
    """PickScore: `logit_scale.exp() * cos(image, prompt)` with a CLIP model fine-tuned on Pick-a-Pic."""

    name = "pickscore"

    def __init__(self, model_path: str = PICKSCORE_MODEL, processor_path: str | None = None, device=None, batch_size: int = 32):
        self.clip = ClipEmbedder(model_path, processor_path, device, batch_size, what="reward pickscore")

    def score(self, images, prompts) -> torch.Tensor:
        n = len(images)
        cos = self.clip.cosine(images, check_prompts(prompts, n))
        return self.clip.model.logit_scale.detach().float().cpu().exp() * cos


class ClipScoreReward(Reward):
    """CLIPScore (Hessel et al. 2021): `100 * max(cos(image, prompt), 0)`."""

    name = "clip"

    def __init__(self, model_path: str = CLIP_MODEL, processor_path: str | None = None, device=None, batch_size: int = 32):
        self.clip = ClipEmbedder(model_path, processor_path, device, batch_size, what="reward clip")

    def score(self, images, prompts) -> torch.Tensor:
        n = len(images)
        return 100.0 * self.clip.cosine(images, check_prompts(prompts, n)).clamp(min=0.0)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP; `layers.{0,2,4,6,7}` are its Linear layers (the file's keys).

    No activations between the Linear layers: the released head was trained that way, so it is affine.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_head(path: str | Path, input_size: int) -> AestheticHead:
    """Read the head's weights (.safetensors, or .pth/.pt through `torch.load(weights_only=True)`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"aesthetic head file '{path}' does not exist: point ':head=' (or aesthetic=FILE) at the "
                        "MLP weights, e.g. sac+logos+ava1-l14-linearMSE.pth")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types; all mean "not a plain tensor state dict"
            raise UserError(f"aesthetic head '{path}' is not a plain state dict of tensors ({_first_line(exc)})") from None
    else:
        raise UserError(f"aesthetic head '{path}': expected a .safetensors, .pth or .pt file")
    head = AestheticHead(input_size)
    expected = set(head.state_dict())
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"aesthetic head '{path}' has keys {got}, expected {sorted(expected)} "
                        "(the improved-aesthetic-predictor MLP layout)")
    width = tuple(state["layers.0.weight"].shape)
    if width != (1024, input_size):
        raise UserError(f"aesthetic head '{path}' takes {width[-1]}-d embeddings but the CLIP model gives "
                        f"{input_size}-d ones: pair the head with the CLIP it was trained on (ViT-L/14 for the LAION heads)")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


def _find_head(folder: Path) -> Path:
    """The one head file in a folder that also holds the CLIP model (model weights excluded)."""
    candidates = sorted(
        p for p in folder.iterdir()
        if p.suffix in _HEAD_SUFFIXES and not p.name.startswith(("model", "pytorch_model"))
    )
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise UserError(f"aesthetic: folder '{folder}' must hold exactly one head file (.safetensors/.pth/.pt other "
                        f"than the CLIP weights), found: {found}; name it with 'aesthetic={folder}:head=FILE'")
    return candidates[0]


def resolve_aesthetic_paths(path: str | None, clip: str | None, head: str | None) -> tuple[str, str]:
    """(CLIP model, head file) from the spec forms documented in docs/evaluation.md."""
    if path and Path(path).is_file():
        if head:
            raise UserError(f"aesthetic={path} is already the head file: drop ':head={head}' or give the CLIP model as PATH")
        return clip or AESTHETIC_CLIP, path
    model = path or clip or AESTHETIC_CLIP
    if path and clip:
        raise UserError(f"aesthetic={path}:clip={clip} names two CLIP models: give the CLIP model once")
    if head:
        return model, head
    if Path(model).is_dir():
        return model, str(_find_head(Path(model)))
    raise UserError("reward aesthetic needs the MLP head weights: write aesthetic=HEAD_FILE (CLIP ViT-L/14 from "
                    f"{AESTHETIC_CLIP}), aesthetic=CLIP:head=HEAD_FILE, or aesthetic=FOLDER holding both")


class AestheticReward(Reward):
    """LAION aesthetic score: `head(normalize(clip_image_embedding))`. Prompts are ignored."""

    name = "aesthetic"

    def __init__(self, clip_path: str, head_path: str, processor_path: str | None = None, device=None, batch_size: int = 32):
        self.clip = ClipEmbedder(clip_path, processor_path, device, batch_size, what="reward aesthetic", need_text=False)
        self.head = load_aesthetic_head(head_path, int(self.clip.model.config.projection_dim)).to(self.clip.device)

    @torch.no_grad()
    def score(self, images, prompts=None) -> torch.Tensor:
        embeddings = F.normalize(self.clip.image_embeddings(images), dim=-1)
        return self.head(embeddings.to(self.clip.device)).squeeze(-1).float().cpu()


@register_reward("pickscore", options=("processor",))
def _pickscore(path, device=None, batch_size=None, processor=None) -> Reward:
    # The official recipe pairs the PickScore weights with the CLIP-H processor from laion.
    default_processor = PICKSCORE_PROCESSOR if path is None else None
    return PickScoreReward(path or PICKSCORE_MODEL, processor or default_processor, device, batch_size or 32)


@register_reward("clip", options=("processor",))
def _clip(path, device=None, batch_size=None, processor=None) -> Reward:
    return ClipScoreReward(path or CLIP_MODEL, processor, device, batch_size or 32)


@register_reward("aesthetic", options=("head", "clip", "processor"))
def _aesthetic(path, device=None, batch_size=None, head=None, clip=None, processor=None) -> Reward:
    clip_path, head_path = resolve_aesthetic_paths(path, clip, head)
    return AestheticReward(clip_path, head_path, processor, device, batch_size or 32)
