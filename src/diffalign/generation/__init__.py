"""Sampling to folders (and, later, self-generated preference datasets)."""

from .prompts import read_prompts
from .sample import GenerationSettings, generate_to_folder, read_manifest

__all__ = ["GenerationSettings", "generate_to_folder", "read_manifest", "read_prompts"]
