"""The method table: every ``method:`` of ``diffalign train``, in one place.

One row per method says which recipe trains it, which config section it reads, which objective it trains with
(and so whether it needs the frozen reference), and the words the CLI help and the model card use. Config
validation, the training loop, ``--help-config`` and the model card all read this table; nothing else
dispatches on the method name. A new method is a new row (``config.register_method``), with a new recipe only
when no existing one computes what its objective needs.

Importing this module loads no torch: recipes and objectives are imported when a run asks for them.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from diffalign.errors import UserError

from . import sections as S


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    - ``recipe(ctx)`` builds the run's recipe (protocol.py) from the loop's :class:`~.protocol.RunContext`;
    - ``section``: the dataclass of its own config keys (sections.py); ``check(keys, cfg)`` its rules;
    - ``objective(keys)``: the per-sample loss it trains with, bound to its keys. Its recipe says what the loss
      is called with: a :class:`~diffalign.objectives.PairObjective` for the pair recipe (its ``reads`` says
      whether the reference runs), the x0 distance for Self-NPO;
    - ``describe(keys)``: the method in a few words (the run's first log line, the model card's method row);
    - ``summary``: one line for ``--help-config``; ``role``: what the trained weights are (model card);
    - ``pairs``: it trains on preference pairs (labels, ties, the latent cache, caption dropout apply);
      ``image_columns``: how many image columns it takes (empty: its ``check`` decides).
    """

    name: str
    summary: str
    role: str
    recipe: Callable[[Any], Any]
    section: type
    objective: Callable[[Any], Any]
    check: Callable[[Any, Any], None] = S.check_nothing
    describe: Optional[Callable[[Any], str]] = None  # None: the name
    pairs: bool = True
    image_columns: tuple[int, ...] = (2,)

    def keys(self, cfg):
        """This method's section of a config."""
        return S.from_config(self.section, cfg)

    def needs_reference(self, keys) -> bool:
        """True when its objective compares against the frozen reference model."""
        return bool(getattr(self.objective(keys), "needs_reference", False))

    def title(self, keys) -> str:
        """``describe(keys)``, or the name."""
        return self.describe(keys) if self.describe is not None else self.name


def lazy(path: str) -> Callable[..., Any]:
    """``"module:attribute"`` (module relative to diffalign.training), imported at the first call: the table
    names recipes and objectives without importing torch."""
    module, _, attribute = path.partition(":")

    def call(*args, **kwargs):
        target = importlib.import_module(f".{module}", __package__)
        for part in attribute.split("."):
            target = getattr(target, part)
        return target(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"lazy({path!r})"
    return call


# ------------------------------------------------------------------------------------------ objectives
def _dpo(keys):
    from ..objectives import dpo_objective

    return dpo_objective(beta=keys.beta, loss_type=keys.loss_type)


def _mapo(keys):
    from ..objectives import mapo_objective

    return mapo_objective(preset=keys.mapo_preset, beta=keys.beta)


def _npo(keys):
    from ..objectives import dpo_objective, mapo_objective

    if keys.npo_objective == "dpo":
        return dpo_objective(beta=keys.beta, loss_type=keys.loss_type, swap=True)
    return mapo_objective(preset=keys.mapo_preset, beta=keys.beta, swap=True)


def _sft(keys):
    from ..objectives import sft_objective

    return sft_objective()


def _selfnpo(keys):
    from ..objectives import selfnpo_distance

    return selfnpo_distance(keys.selfnpo_loss, huber_c=keys.huber_c)


def _describe_npo(keys) -> str:
    return f"npo (objective {keys.npo_objective} on swapped pairs)"


def _describe_selfnpo(keys) -> str:
    return (f"selfnpo ({keys.selfnpo_start} start, {keys.selfnpo_start_range} start range, K={keys.teacher_steps} "
            f"on a {keys.ddim_grid}-step grid, w={keys.teacher_guidance:g}"
            f"{', teacher calls traced' if keys.trace_teacher else ''})")


_PAIRS = "recipes:PreferenceRecipe.for_run"
_TABLE: dict[str, Method] = {}


def add_row(method: Method) -> Method:
    """Put a row in the table, replacing one of the same name. Extensions call ``config.register_method``, which
    first checks that the row fits ``TrainConfig`` (the config is built from this table, so the check lives there)."""
    _TABLE[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The row of ``name`` (case-insensitive); a :class:`UserError` with the known names otherwise."""
    key = str(name).strip().lower()
    if key in _TABLE:
        return _TABLE[key]
    close = difflib.get_close_matches(key, list(_TABLE), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"method={name} is not a known method: {'|'.join(_TABLE)}{hint}")


def method_names() -> tuple[str, ...]:
    return tuple(_TABLE)


def methods() -> tuple[Method, ...]:
    return tuple(_TABLE.values())


def pair_methods() -> tuple[str, ...]:
    """The methods that train on preference pairs."""
    return tuple(m.name for m in _TABLE.values() if m.pairs)


def owners(key_name: str) -> tuple[str, ...]:
    """The methods whose sections hold ``key_name``."""
    return tuple(m.name for m in _TABLE.values() if key_name in S.section_keys(m.section))


def sections() -> tuple[type, ...]:
    """Every section class in the table, each once, in table order."""
    seen: list[type] = []
    for m in _TABLE.values():
        if m.section not in seen:
            seen.append(m.section)
    return tuple(seen)


def help_text() -> str:
    """The help of the ``method`` key: every method's summary."""
    return "Training method (required): " + "; ".join(f"{m.name} = {m.summary}" for m in _TABLE.values()) + "."


# ---------------------------------------------------------------------------------------------- the rows
_TABLE.update((row.name, row) for row in (
    Method("dpo", summary="Diffusion-DPO (needs the frozen reference: for LoRA the base with adapters off)",
           role="a preference-aligned model (Diffusion-DPO, Wallace et al. 2023)",
           recipe=lazy(_PAIRS), section=S.DPOKeys, objective=_dpo, check=S.check_dpo),
    Method("mapo", summary="MaPO (reference-free, one UNet pass per step)",
           role="a preference-aligned model (MaPO, Hong et al. 2024; no reference model)",
           recipe=lazy(_PAIRS), section=S.MaPOKeys, objective=_mapo, check=S.check_mapo,
           describe=lambda keys: f"mapo (preset {keys.mapo_preset})"),
    Method("npo", summary="Diffusion-NPO (a negative model: a preference objective on swapped pairs, see "
                          "npo_objective)",
           role="a NEGATIVE model (Diffusion-NPO, Wang et al. 2025): use it only in the unconditional/negative "
                "branch of classifier-free guidance, never as the positive model",
           recipe=lazy(_PAIRS), section=S.NPOKeys, objective=_npo, check=S.check_npo, describe=_describe_npo),
    Method("sft", summary="plain fine-tuning on the preferred images",
           role="a model fine-tuned on the preferred images only (SFT baseline)",
           recipe=lazy(_PAIRS), section=S.NoKeys, objective=_sft, image_columns=(1, 2)),
    Method("selfnpo", summary="Self-NPO (a negative model learned from the model itself, no preference labels: "
                              "see the selfnpo_* / teacher_* keys)",
           role="a NEGATIVE model (Self-NPO, Wang et al. 2025): use it only in the negative branch of "
                "classifier-free guidance",
           recipe=lazy("selfnpo:SelfNPORecipe.for_run"), section=S.SelfNPOKeys,
           objective=_selfnpo, check=S.check_selfnpo, describe=_describe_selfnpo,
           pairs=False, image_columns=()),
))


__all__ = ["Method", "add_row", "get_method", "help_text", "lazy", "method_names", "methods", "owners",
           "pair_methods", "sections"]
