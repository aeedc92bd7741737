"""Sampling to folders (`generate_to_folder`) and self-generated preference datasets (`run_pairs`,
`diffalign pairs`: the prefix, ranked and target recipes, see `pairs/`)."""

from ..data.prompts import read_prompts
from .manifest import read_manifest
from .pairs import PairsConfig, PairsResult, make_pairs, read_pairs, run_pairs
from .sample import GenerationSettings, generate_to_folder

__all__ = ["GenerationSettings", "PairsConfig", "PairsResult", "generate_to_folder", "make_pairs", "read_manifest",
           "read_pairs", "read_prompts", "run_pairs"]
