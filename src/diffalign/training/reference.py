"""The frozen reference model of the objectives that compare against one (DPO, NPO with npo_objective=dpo).

Which objectives need it is the method table's to say (methods.py); what it is depends on what is trained:

- a LoRA: the trained network itself with its adapters switched off (:class:`AdaptersOff`), no second copy;
- a full fine-tune: a frozen copy of the starting network, made before training starts (:class:`FrozenCopy`).

Either way ``active(net)`` is a context that yields the module to call in place of the trained ``net``; the
family's own network is never replaced, so an exception inside a reference pass leaves everything as it was.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from ..models.lora import has_lora


class FrozenCopy:
    """A frozen copy of a network (no gradient, eval mode): the reference of a full fine-tune."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @classmethod
    def of(cls, module: torch.nn.Module) -> "FrozenCopy":
        return cls(copy.deepcopy(module).requires_grad_(False).eval())

    @contextlib.contextmanager
    def active(self, net) -> Iterator[torch.nn.Module]:
        yield self.module


class AdaptersOff:
    """The trained network with its LoRA adapters switched off (``bare`` is the network inside any DDP wrapper;
    ``net``, the one called, may be the wrapper).

    Switching is peft's per-layer ``_disable_adapters`` flag on a list of the adapter layers found once, set and
    put back around the pass. It is what ``unet.disable_adapters()`` / ``enable_adapters()`` end up setting, without
    their two walks over every module and the requires_grad resets per micro-batch (6 ms of a 108 ms reference
    forward on the toy UNet, benchmarks/RESULTS.md); under the reference pass's no_grad the LoRA weights are not
    used at all, so the numbers are the same.
    """

    module = None  # no module of its own

    def __init__(self, bare: torch.nn.Module):
        self.bare = bare
        self._layers: list | None = None
        self._key: tuple | None = None

    def _tuner_layers(self) -> list:
        key = tuple(getattr(self.bare, "peft_config", None) or ())
        if self._layers is None or key != self._key:  # found again if adapters were added or removed
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self.bare.modules() if isinstance(m, BaseTunerLayer)]
            self._key = key
        return self._layers

    @contextlib.contextmanager
    def active(self, net) -> Iterator[torch.nn.Module]:
        if not has_lora(self.bare):
            yield net
            return
        layers = self._tuner_layers()
        saved = [m._disable_adapters for m in layers]
        for m in layers:
            m._disable_adapters = True
        try:
            yield net
        finally:
            for m, flag in zip(layers, saved):
                m._disable_adapters = flag


__all__ = ["AdaptersOff", "FrozenCopy"]
