"""Where a model comes from: a local diffusers folder or a hub id, checked up front.

diffusers and huggingface_hub fail deep inside loading with long, multi-line messages (or a network timeout when
offline). Every loader in `models/` first resolves its source here, so a user sees one line that names the path
and says what to do. Here too the name `toy` becomes the shipped toy pipeline's folder, for every command and
config that takes a model (`resolve_model`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..toy.paths import toy_model_path  # the one place the model alias 'toy' is resolved

TOY_MODEL_ALIAS = "toy"

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (huggingface_hub only reads it at import time)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message: UserError messages are one line."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


@dataclass(frozen=True)
class ModelSource:
    """A resolved pipeline source: what to pass to `from_pretrained` and the parsed `model_index.json`."""

    path: str
    local: bool
    model_index: dict[str, Any] = field(repr=False)

    @property
    def local_files_only(self) -> bool:
        """Never touch the network for a local folder or when the user asked for offline mode."""
        return self.local or hub_offline()

    @property
    def class_name(self) -> str:
        return str(self.model_index.get("_class_name", ""))

    def has_component(self, name: str) -> bool:
        entry = self.model_index.get(name)
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def resolve_model(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """`toy` is shorthand for the shipped toy pipeline's folder; anything else is returned as given."""
    return str(toy_model_path()) if str(name_or_path) == TOY_MODEL_ALIAS else name_or_path


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~"))
        and not any(p in (".", "..") for p in parts)
    )


def resolve_source(path_or_id: str | os.PathLike, what: str = "model") -> ModelSource:
    """Check that `path_or_id` (`toy`: the shipped toy pipeline) is a diffusers pipeline folder or a reachable hub
    repo; read its model_index.json.

    Raises `UserError` for: a missing local path that is not a hub id, a hub id that cannot be fetched (e.g.
    offline and not cached), a file instead of a folder, and a folder without `model_index.json`.
    """
    text = os.fspath(resolve_model(path_or_id))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"{what} path {text!r} is a file, not a diffusers pipeline folder; "
                "give the folder that holds model_index.json (single-file checkpoints must be converted first)"
            )
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise UserError(
                f"{what} folder {text!r} is not a diffusers pipeline folder (no model_index.json); "
                "give the pipeline's root folder, e.g. the one saved by pipe.save_pretrained()"
            )
        return ModelSource(str(path), True, _read_json(index_file, text))

    if not _looks_like_hub_id(text):
        raise UserError(f"{what} path {text!r} does not exist; give a diffusers pipeline folder or a hub id like org/name")
    return ModelSource(text, False, _fetch_hub_index(text, what))


def _read_json(file: Path, shown: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {file.name} of {shown!r}: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{file.name} of {shown!r} is not a JSON object; the folder is not a diffusers pipeline")
    return data


def _fetch_hub_index(repo_id: str, what: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    try:
        file = hf_hub_download(repo_id, "model_index.json", local_files_only=offline)
    except Exception as exc:
        if offline:
            raise UserError(
                f"{what} {repo_id!r} is not a local folder and is not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set); download it first or give a local pipeline folder"
            ) from exc
        raise UserError(
            f"{what} {repo_id!r} is not a local folder and could not be fetched from the hub "
            f"({first_line(exc)}); check the id, your network and your token"
        ) from exc
    return _read_json(Path(file), repo_id)


def load_component(loader: Callable[..., Any], what: str, shown: str, *args: Any, **kwargs: Any) -> Any:
    """Call a `from_pretrained`, turning its long load errors into one user-facing line."""
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"cannot load the {what} of {shown!r}: {first_line(exc)}") from exc


@dataclass(frozen=True)
class VaeRequest:
    """An optional separate VAE (a model folder or hub id with config.json, not a pipeline)."""

    path: str | os.PathLike | None

    def load(self, dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL

        text = os.fspath(self.path)
        local = Path(text).expanduser().exists()
        if not local and (text.startswith((".", "/", "~")) or text.count("/") != 1):
            raise UserError(f"VAE path {text!r} does not exist; give a VAE folder (with config.json) or a hub id")
        if local and not (Path(text).expanduser() / "config.json").is_file():
            raise UserError(f"VAE folder {text!r} has no config.json; give the folder saved by vae.save_pretrained()")
        return load_component(
            AutoencoderKL.from_pretrained, "VAE", text, text, local_files_only=local or hub_offline(), dtype=dtype
        )
