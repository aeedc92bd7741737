"""Model families behind one interface: load, encode, noise maths, predict, LoRA and full fine-tuning.

`load_family(path)` gives the training adapter (family detected from model_index.json); `load_pipeline(path)`
gives a stock diffusers pipeline for generation, and `load_lora_into_pipeline` loads a LoRA into it, failing
loudly when nothing matched.
"""

from .base import Conditioning, ModelFamily
from .cogvideox import CogVideoXFamily
from .flow import FlowFamily, FlowSchedule
from .flux import FluxFamily
from .loading import FAMILIES, PIPELINE_FAMILIES, detect_family, family_class, load_family, load_pipeline
from .lora import (
    DEFAULT_TARGET_MODULES,
    LORA_WEIGHT_NAME,
    add_lora,
    load_lora_into_pipeline,
    load_lora_into_unet,
    lora_disabled,
    lora_parameters,
    resolve_lora_file,
    save_lora,
)
from .schedule import NoiseSchedule
from .sd import SDFamily
from .sd3 import SD3Family
from .sdxl import SDXLFamily
from .source import ModelSource, resolve_model, resolve_source

__all__ = [
    "Conditioning",
    "ModelFamily",
    "NoiseSchedule",
    "SDFamily",
    "SDXLFamily",
    "CogVideoXFamily",
    "FlowFamily",
    "FlowSchedule",
    "FluxFamily",
    "SD3Family",
    "FAMILIES",
    "PIPELINE_FAMILIES",
    "detect_family",
    "family_class",
    "load_family",
    "load_pipeline",
    "ModelSource",
    "resolve_model",
    "resolve_source",
    "DEFAULT_TARGET_MODULES",
    "LORA_WEIGHT_NAME",
    "add_lora",
    "save_lora",
    "load_lora_into_unet",
    "load_lora_into_pipeline",
    "lora_disabled",
    "lora_parameters",
    "resolve_lora_file",
]
