"""Each method's own config keys (its section) and the rules on them.

A section is a dataclass of the keys one method reads, with their types, defaults and help. ``TrainConfig`` lists
every section's keys flat beside the common ones, so a YAML file and ``--key=value`` look as they always did; the
method table (methods.py) says which section each method reads. What follows from that, for every method alike
(``TrainConfig.validate``): a key of another method's section, set to anything but its default, is refused
("only applies to ..."). What is left here are the rules inside a section (a key required, two keys that
contradict each other) and the common keys a method cannot use: ``check_*(keys, cfg)``, each raising
:class:`~diffalign.errors.UserError` naming the key.

Sections hold data only (they are ``TrainConfig``'s bases): behaviour goes in functions here or in the recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from diffalign.errors import UserError


def key(default: Any, help: str, *, applies_to: Optional[str] = None):
    """A config key: its default and help (``--help-config``); ``applies_to`` names, for the error when another
    method sets it, what it applies to (default: the methods whose sections hold it)."""
    metadata = {"help": help, **({"applies_to": applies_to} if applies_to else {})}
    return field(default=default, metadata=metadata)


def section_keys(section) -> tuple[str, ...]:
    """The key names of a section (class or instance)."""
    return tuple(f.name for f in dataclasses.fields(section))


def from_config(section: type, cfg):
    """The ``section`` of a flat config: its keys' values picked from ``cfg``."""
    return section(**{name: getattr(cfg, name) for name in section_keys(section)})


# ------------------------------------------------------------------------------------- shared declarations
# A key that several sections read is declared once, here, so its default and help are the same everywhere.
def _beta():
    return key(
        None, "Inverse temperature. DPO and NPO (required): the original Diffusion-DPO convention with the 0.5, "
        "L = -log sigmoid(-0.5*beta*(...)); the diffusers SD1.5 script drops the 0.5, so its beta_dpo 2500 is "
        "5000 here. Paper values: 2000 SD1.5 and 5000 SDXL (DPO); 1000 SD1.5 and 2000 SDXL (NPO). MaPO: only "
        "with mapo_preset=paper (8 general, 64 style/safety, 1024 personalization).",
        applies_to="DPO, NPO and MaPO with mapo_preset=paper")


def _loss_type():
    return key("sigmoid", "DPO/NPO loss on the logit: sigmoid (the paper), hinge or ipo.",
               applies_to="DPO/NPO with a reference")


def _mapo_preset():
    return key("official", "MaPO constants: official = the released code (scale 0.5, k 1000, weight 0.1; no beta); "
               "paper = paper v2 (scale 1, k = beta, weight = 1/beta; needs beta).",
               applies_to="MaPO (mapo, or npo with npo_objective=mapo)")


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class DPOKeys:
    """method: dpo (docs/methods.md#diffusion-dpo)."""

    beta: Optional[float] = _beta()
    loss_type: Literal["sigmoid", "hinge", "ipo"] = _loss_type()
    beta_dpo: Optional[float] = key(None, "beta as the diffusers SD1.5 DPO script means it (no 0.5 in the logit): "
                                    "beta_dpo B trains as beta 2B here; both are recorded in config.yaml.")


@dataclass
class MaPOKeys:
    """method: mapo (docs/methods.md#mapo)."""

    mapo_preset: Literal["official", "paper"] = _mapo_preset()
    beta: Optional[float] = _beta()


@dataclass
class NPOKeys:
    """method: npo (docs/methods.md#diffusion-npo): a preference objective on swapped pairs, with its keys."""

    npo_objective: Literal["dpo", "mapo"] = key(
        "dpo", "The preference objective NPO runs on swapped pairs: dpo (the NPO paper; uses beta and the "
        "reference) or mapo (reference-free; uses mapo_preset).")
    beta: Optional[float] = _beta()
    loss_type: Literal["sigmoid", "hinge", "ipo"] = _loss_type()
    mapo_preset: Literal["official", "paper"] = _mapo_preset()


@dataclass
class NoKeys:
    """A method with no keys of its own (sft)."""


@dataclass
class SelfNPOKeys:
    """method: selfnpo (docs/methods.md#self-npo)."""

    selfnpo_start: Literal["noise", "images"] = key(
        "noise", "Where the teacher's trajectories start. noise: data-free, prompts only (the paper's claim): "
        "pure noise at the top of the DDIM grid, lower starts reached by the teacher's own denoising from "
        "noise; images: noised latents of real image-caption data at t_start (what the official code does).")
    selfnpo_start_range: Literal["official", "interior"] = key(
        "official", "Which start points t_start = g[i] the teacher's K steps may start from, on the ddim_grid g "
        "(N points; T-1 at the top). official (the official training code): i uniform over all N points, the K "
        "steps clipped at t = 0 (the grid extended by t = 0, the end at min(i+K, N)), so about K/N of the samples "
        "end at t = 0 and the student's s is then uniform on 1..T-1; interior: i uniform over 0..N-1-K, always K "
        "full steps, no trajectory starts below g[N-1-K] nor ends below the lowest grid point (239 and 39 for "
        "N = 25, K = 5).")
    teacher_ema_decay: float = key(
        0.999, "Decay of the teacher, an EMA of the student initialised at the base model, updated after every "
        "optimizer step (LoRA: an EMA of the adapter weights on the shared base UNet).")
    teacher_guidance: float = key(
        -1.0, "Teacher guidance w in pred = cond + w*(cond - uncond): -1 = unconditional (official SD1.5), "
        "-5 (official SDXL); 0 = conditional.")
    ddim_grid: int = key(25, "Steps of the DDIM grid the teacher walks on (trailing spacing: T-1 is the top).")
    teacher_steps: int = key(
        5, "K: DDIM steps the teacher takes from x_{t_start} to x_t per training step (fewer near t = 0 with "
        "selfnpo_start_range=official). A sample costs its steps + 1 teacher network calls; the batch steps "
        "together (see diffalign.training.selfnpo for the count, also with selfnpo_start=noise).")
    selfnpo_loss: Literal["pseudo_huber", "l2"] = key(
        "pseudo_huber", "Distance between the student's x0 prediction at (x_s, s, caption) and the teacher's "
        "x0 estimate at (x_t, t): pseudo_huber (official, see huber_c) or l2 (per-element mean squared error).")
    huber_c: float = key(1e-3, "c of the pseudo-Huber distance sqrt(d^2 + c^2) - c, per element (official 1e-3).")
    trace_teacher: bool = key(
        False, "Replay the teacher's network calls from torch.jit traces (one per per-row input shape, checked bit "
        "for bit against the eager call once per batch size): the same results with less Python overhead per call, which "
        "is most of a small UNet's time on a CPU. UNet families (sd, sdxl) without FSDP.")


# ------------------------------------------------------------------------------------------------- rules
def _check_beta_positive(beta) -> None:
    if beta is not None and not beta > 0:
        raise UserError(f"beta must be > 0, got {beta}")


def _check_reference_beta(beta, what: str, hint: str) -> None:
    if beta is None:
        raise UserError(f"beta is required for {what}: pass --beta=... (paper values: {hint}; "
                        "original convention with the 0.5)")


def _check_mapo(preset: str, beta) -> None:
    if preset == "paper" and beta is None:
        raise UserError("beta is required with mapo_preset=paper: pass --beta=8 (general preference), "
                        "64 (style/safety) or 1024 (personalization)")
    if preset == "official" and beta is not None:
        raise UserError("beta does not apply to mapo_preset=official (fixed k=1000, weight=0.1): remove "
                        "beta, or pass --mapo_preset=paper to use k = beta, weight = 1/beta")


def check_dpo(keys: DPOKeys, cfg) -> None:
    if keys.beta_dpo is not None:
        if not keys.beta_dpo > 0:
            raise UserError(f"beta_dpo must be > 0, got {keys.beta_dpo}")
        converted = 2.0 * keys.beta_dpo
        if keys.beta is not None and keys.beta != converted:
            raise UserError(f"beta={keys.beta} and beta_dpo={keys.beta_dpo} disagree: beta_dpo (the diffusers "
                            f"script's convention) is beta / 2 here, so beta_dpo={keys.beta_dpo} is beta={converted}; "
                            "give one of them")
        cfg.beta = keys.beta = converted  # the run's resolved config records both
    _check_beta_positive(keys.beta)
    _check_reference_beta(keys.beta, "DPO", "2000 SD1.5, 5000 SDXL")


def check_mapo(keys: MaPOKeys, cfg) -> None:
    _check_beta_positive(keys.beta)
    _check_mapo(keys.mapo_preset, keys.beta)


def check_npo(keys: NPOKeys, cfg) -> None:
    _check_beta_positive(keys.beta)
    if keys.npo_objective == "dpo":
        what = "NPO (npo_objective=dpo)"
        _check_reference_beta(keys.beta, what, "1000 SD1.5, 2000 SDXL")
        if keys.mapo_preset != "official":
            raise UserError(f"mapo_preset={keys.mapo_preset} only applies to MaPO; {what} ignores it: remove it")
        return
    if keys.loss_type != "sigmoid":
        raise UserError(f"loss_type={keys.loss_type} only applies to DPO/NPO with a reference; "
                        "method=npo with npo_objective=mapo has no such choice")
    _check_mapo(keys.mapo_preset, keys.beta)


def check_selfnpo(keys: SelfNPOKeys, cfg) -> None:
    """Self-NPO learns from the model itself: the preference-data keys and the pair methods' EMA contradict it."""
    if cfg.use_ema:
        raise UserError("use_ema does not apply to method=selfnpo: its teacher is already an EMA of the "
                        "student (teacher_ema_decay) and the student is saved; set --use_ema=false")
    if cfg.ties != "drop":
        raise UserError(f"ties={cfg.ties} is about preference pairs; method=selfnpo reads no labels: remove it")
    if tuple(cfg.label_columns) != ("label_0", "label_1"):
        raise UserError(f"label_columns={list(cfg.label_columns)} names preference labels, and method=selfnpo "
                        "learns from the model itself without labels: remove label_columns (or train a "
                        "preference method: dpo, mapo, npo)")
    if cfg.use_cache is True:
        raise UserError("use_cache (the preference-pair latent cache) does not apply to method=selfnpo: "
                        "set --use_cache=false")
    if keys.selfnpo_start == "images" and cfg.dataset_name == "toy":
        raise UserError("dataset_name=toy gives prompts only, and selfnpo_start=images needs image-caption data: "
                        "pass a parquet/dataset with an image and a caption column, or --selfnpo_start=noise")
    if keys.teacher_steps < 1:
        raise UserError(f"teacher_steps must be >= 1 (the teacher must take a step), got {keys.teacher_steps}")
    if keys.ddim_grid < keys.teacher_steps + 1:
        raise UserError(f"ddim_grid={keys.ddim_grid} is too coarse for teacher_steps={keys.teacher_steps}: "
                        "the grid needs at least teacher_steps + 1 points")
    if not 0 <= keys.teacher_ema_decay < 1:
        raise UserError(f"teacher_ema_decay must be in [0, 1), got {keys.teacher_ema_decay}")
    if not keys.huber_c > 0:
        raise UserError(f"huber_c must be > 0, got {keys.huber_c}")
    if keys.selfnpo_start == "images" and len(cfg.image_columns) != 1:
        raise UserError(f"image_columns needs exactly 1 column for selfnpo_start=images (one image per "
                        f"caption), got {list(cfg.image_columns)}: pass e.g. --image_columns=image "
                        "(or --image_columns=jpg_0 for Pick-a-Pic)")


def check_nothing(keys, cfg) -> None:
    """A method whose section has no rules."""


__all__ = ["DPOKeys", "MaPOKeys", "NPOKeys", "NoKeys", "SelfNPOKeys", "check_dpo", "check_mapo", "check_nothing",
           "check_npo", "check_selfnpo", "from_config", "key", "section_keys"]
