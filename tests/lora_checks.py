"""Shared assertion for training tests: a saved LoRA differs from the initial LoRA in every weight."""

import torch
from safetensors.torch import load_file

from diffalign.models import load_family


def assert_every_lora_weight_changed(out_dir, pipeline_path, rank: int = 4, seed: int = 0) -> None:
    """Rebuild the initial LoRA from the run's seed (training seeds its init) and compare weight by weight;
    B starts at zero, A at a seeded random init: both must have moved."""
    weights = load_file(f"{out_dir}/pytorch_lora_weights.safetensors")
    torch.manual_seed(seed)
    fresh = load_family(pipeline_path)
    fresh.add_lora(rank)
    init = {k: v for k, v in fresh.unet.named_parameters() if v.requires_grad}
    assert len(init) == len(weights) > 0
    for name, value in init.items():
        module, which = name.split(".lora_")
        key = f"unet.{module}.lora.{'down' if which.startswith('A') else 'up'}.weight"
        assert not torch.equal(weights[key], value.detach()), f"{name} did not change"
