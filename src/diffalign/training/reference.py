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

from ..models import lora_disabled


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
    ``net``, the one called, may be the wrapper)."""

    module = None  # no module of its own

    def __init__(self, bare: torch.nn.Module):
        self.bare = bare

    @contextlib.contextmanager
    def active(self, net) -> Iterator[torch.nn.Module]:
        with lora_disabled(self.bare):
            yield net


__all__ = ["AdaptersOff", "FrozenCopy"]
