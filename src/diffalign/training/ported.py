"""Config keys of the diffusers training scripts that users type when they port a command, mapped to ours.

A key listed here is either translated to the keys that mean the same thing here (with the same meaning the
script gives it), or refused with what to use instead; it never trains silently as something else. ``beta_dpo``
is a key of its own (``DPOKeys``), not a translation, so that config.yaml records both conventions.
"""

from __future__ import annotations

from typing import Any

from ..config_loader import coerce_value
from ..errors import UserError


def _flag(key: str, raw: Any, source: str) -> bool:
    try:
        return bool(coerce_value(raw, bool))
    except Exception:
        raise UserError(f"config key {key!r} {source}: expected true or false, got {raw!r}") from None


def _no_hflip(key, raw, source):
    # train_diffusion_dpo_sdxl.py flips by default; --no_hflip turns it off
    return [("random_flip", not _flag(key, raw, source))]


def _random_crop(key, raw, source):
    return [("center_crop", not _flag(key, raw, source))]


def _allow_tf32(key, raw, source):
    return [("allow_tf32", _flag(key, raw, source))]


# key -> (translation, or None to refuse; the message for a refusal)
PORTED_KEYS = {
    "no_hflip": (_no_hflip, ""),
    "random_crop": (_random_crop, ""),
    "allow_tf32": (_allow_tf32, ""),
    "num_train_epochs": (None, "set max_train_steps instead (steps = epochs x rows / global batch); runs here "
                               "are counted in optimizer updates, as the DPO, MaPO and NPO papers count them"),
    "validation_epochs": (None, "set validation_steps instead (validation every N optimizer updates)"),
    "snr_gamma": (None, "Min-SNR loss weighting is not implemented for the preference objectives here (the "
                        "Diffusion-DPO, MaPO and NPO recipes do not use it): remove it"),
    "noise_offset": (None, "noise offset is not implemented here (the Diffusion-DPO, MaPO and NPO recipes do not "
                           "use it): remove it"),
    "hub_token": (None, "the hub token is read from the environment (HF_TOKEN) or the huggingface_hub login "
                        "(`hf auth login`), never from a config, so it is not written to config.yaml: remove it "
                        "and set HF_TOKEN"),
    "prediction_type": (None, "the prediction type comes from the model's scheduler config (epsilon or "
                              "v_prediction, as the model was trained): remove it; to train a model under another "
                              "prediction type, save its scheduler config with that type first"),
}


def translate_ported_key(key: str, raw: Any, source: str) -> list[tuple[str, Any]] | None:
    """The (key, value) pairs a diffusers-script key stands for here; None when `key` is not one of them.
    Raises UserError for a script key with no equivalent, saying what to use instead."""
    if key not in PORTED_KEYS:
        return None
    translate, refusal = PORTED_KEYS[key]
    if translate is None:
        raise UserError(f"config key {key!r} {source} is a diffusers-script key with no equivalent here: {refusal}")
    return translate(key, raw, source)
