"""The real model architectures, without their weights: the shipped `config.json` files (architectures/*.json,
written from the public hyper-parameters of each release) and their modules built on the meta device (shapes
only, no memory) or at random init.

The planner counts weights on the meta device; the real-shape benchmark (benchmarks/real_shapes.py) builds the
same modules at random init and trains a step with them, so a plan and a measurement describe the same network.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import UserError

HERE = Path(__file__).parent / "architectures"

#: Component class name (diffusers or transformers) -> the library that holds it.
_LIBRARY = {
    "UNet2DConditionModel": "diffusers", "AutoencoderKL": "diffusers", "AutoencoderKLCogVideoX": "diffusers",
    "CogVideoXTransformer3DModel": "diffusers", "CLIPTextModel": "transformers",
    "CLIPTextModelWithProjection": "transformers", "T5EncoderModel": "transformers",
}


@dataclass(frozen=True)
class Architecture:
    """One released pipeline: its denoiser, VAE and text encoders (component name -> JSON file), the training
    noise schedule (a scheduler config), the hub ids it is known by and the public parameter counts."""

    name: str
    family: str  # models/loading.py FAMILIES
    denoiser: str
    vae: str
    text_encoders: tuple[str, ...]
    scheduler: dict
    hub_ids: tuple[str, ...] = ()
    native_resolution: int = 512
    native_frames: int | None = None  # video: frames of the native clip
    native_size: tuple[int, int] | None = None  # video: (height, width)
    public_counts: dict = field(default_factory=dict)  # component file -> parameters (the releases' figure)

    @property
    def vae_upcast(self) -> bool:
        """The VAE stays float32 under fp16/bf16: its config.json asks for force_upcast (read as
        models/base.py load_pipeline_vae reads it: absent means no)."""
        return bool(config(self.vae).get("force_upcast", False))

    @property
    def files(self) -> dict[str, str]:
        names = {"denoiser": self.denoiser, "vae": self.vae}
        for i, f in enumerate(self.text_encoders):
            names["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = f
        return names


_DDPM_SD = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False}
_COGVIDEOX_DDIM = {"_class_name": "CogVideoXDDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                   "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                   "clip_sample": False, "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
                   "snr_shift_scale": 3.0, "timestep_spacing": "trailing"}

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("sd15", "sd", "sd15_unet.json", "sd_vae.json", ("clip_l_text.json",), _DDPM_SD,
                 hub_ids=("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                          "CompVis/stable-diffusion-v1-4", "sd-legacy/stable-diffusion-v1-5"),
                 native_resolution=512,
                 public_counts={"sd15_unet.json": 859.52e6, "sd_vae.json": 83.65e6, "clip_l_text.json": 123.06e6}),
    Architecture("sdxl", "sdxl", "sdxl_unet.json", "sdxl_vae.json", ("clip_l_text.json", "clip_bigg_text.json"),
                 _DDPM_SD,
                 hub_ids=("stabilityai/stable-diffusion-xl-base-1.0",), native_resolution=1024,
                 public_counts={"sdxl_unet.json": 2567.46e6, "sdxl_vae.json": 83.65e6,
                                "clip_l_text.json": 123.06e6, "clip_bigg_text.json": 694.66e6}),
    Architecture("cogvideox-2b", "cogvideox", "cogvideox_2b_transformer.json", "cogvideox_2b_vae.json",
                 ("t5_xxl_encoder.json",), _COGVIDEOX_DDIM, hub_ids=("THUDM/CogVideoX-2b", "zai-org/CogVideoX-2b"),
                 native_resolution=480, native_frames=49, native_size=(480, 720),
                 public_counts={"cogvideox_2b_transformer.json": 1.69e9, "t5_xxl_encoder.json": 4.76e9}),
    Architecture("cogvideox-5b", "cogvideox", "cogvideox_5b_transformer.json", "cogvideox_5b_vae.json",
                 ("t5_xxl_encoder.json",), {**_COGVIDEOX_DDIM, "snr_shift_scale": 1.0},
                 hub_ids=("THUDM/CogVideoX-5b", "zai-org/CogVideoX-5b"),
                 native_resolution=480, native_frames=49, native_size=(480, 720),
                 public_counts={"cogvideox_5b_transformer.json": 5.57e9, "t5_xxl_encoder.json": 4.76e9}),
)}

#: Fixed modality sizes the activations depend on.
TEXT_TOKENS = {"sd": 77, "sdxl": 77, "cogvideox": 226}


def architecture(name: str) -> Architecture:
    key = str(name).strip().lower()
    if key not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; shipped: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[key]


def architecture_for(model: str | None) -> Architecture:
    """The shipped architecture of a hub id or a local pipeline folder (its model_index.json class and its
    denoiser's config.json matched against the shipped ones)."""
    if model:
        for arch in ARCHITECTURES.values():
            if model in arch.hub_ids or model.lower() == arch.name:
                return arch
        folder = Path(model)
        if (folder / "model_index.json").is_file():
            return _match_folder(folder)
    known = ", ".join(f"{a.name} ({a.hub_ids[0]})" for a in ARCHITECTURES.values())
    raise UserError(f"no shipped architecture for pretrained_model_name_or_path={model!r}: pass --architecture=NAME "
                    f"with one of {known}")


def _match_folder(folder: Path) -> Architecture:
    from ..models.folders import denoiser_folder

    sub = denoiser_folder(folder) or "unet"
    try:
        own = json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        own = {}
    for arch in ARCHITECTURES.values():
        shipped = config(arch.denoiser)
        keys = [k for k in shipped if not k.startswith("_")]
        if own and all(own.get(k) == shipped[k] for k in keys if k in own) and \
                sum(k in own for k in keys) >= len(keys) - 2:
            return arch
    raise UserError(f"{folder}: its {sub}/config.json matches none of the shipped architectures "
                    f"({', '.join(ARCHITECTURES)}); pass --architecture=NAME for the closest one")


@lru_cache(maxsize=None)
def _config_text(file: str) -> str:
    path = HERE / file
    if not path.is_file():
        raise UserError(f"no shipped architecture file {file!r} in {HERE}")
    return path.read_text(encoding="utf-8")


def config(file: str) -> dict:
    """The config.json contents of one shipped component (a fresh dict)."""
    return json.loads(_config_text(file))


def class_name(cfg: dict) -> str:
    return cfg.get("_class_name") or cfg["architectures"][0]


def build(file: str, *, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
          overrides: dict | None = None) -> torch.nn.Module:
    """The module of a shipped config at random init (`device="cpu"`) or shapes only (`device="meta"`, no memory).

    `overrides` changes config keys (e.g. `{"num_layers": 2}` for a reduced T5, clearly not the real one)."""
    cfg = {**config(file), **(overrides or {})}
    name = class_name(cfg)
    if _LIBRARY.get(name) == "diffusers":
        import diffusers

        cls = getattr(diffusers, name)
        kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
        with _on(device):
            module = cls.from_config(kwargs)
    elif _LIBRARY.get(name) == "transformers":
        import transformers

        cls = getattr(transformers, name)
        model_type = cfg.pop("model_type")
        cfg.pop("architectures", None)
        conf = transformers.AutoConfig.for_model(model_type, **cfg)
        with _on(device):
            module = cls(conf)
        module.tie_weights()  # T5: the encoder's embedding is the shared one (one tensor in the checkpoints)
    else:
        raise UserError(f"{file}: class {name!r} is not one the shipped architectures use")
    if str(device) != "meta":
        module.to(dtype)
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def _on(device):
    if str(device) == "meta":
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            yield
    else:
        with torch.device(device):
            yield


@lru_cache(maxsize=None)
def parameter_count(file: str) -> int:
    """Parameters of a shipped component, counted on the meta device (no memory, ~a second for the biggest)."""
    return sum(p.numel() for p in build(file, device="meta").parameters())


def scheduler(arch: Architecture):
    """The training noise scheduler of an architecture (DDPM for the UNets, CogVideoX's own DDIM for CogVideoX)."""
    import diffusers

    cfg = dict(arch.scheduler)
    cls = getattr(diffusers, cfg.pop("_class_name"))
    return cls.from_config(cfg)


__all__ = ["ARCHITECTURES", "Architecture", "TEXT_TOKENS", "architecture", "architecture_for", "build", "config",
           "parameter_count", "scheduler"]
