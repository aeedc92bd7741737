"""A UNet's no-gradient calls replayed from a `torch.jit.trace` recording: the same operations on the same weights.

The Self-NPO teacher walks each sample from noise to its start point, about 25 calls of the network per training
step on a few rows each. On a small network (the toy UNet) most of such a call's time is Python: walking the
module tree, the attention processors and the LoRA layers. A trace records the operations of one call and replays
them in C++; the weights are read at each call, not copied, so the teacher's EMA weights swapped into the LoRA
layers and the optimizer's updates are seen. `TracedDenoiser` records one trace per per-row input shape and dtype
and checks its replay against the eager call bit for bit, once for each batch size it serves; a batch size whose
replay differs gets a trace of its own, and runs eagerly if that one differs too.
Calls that need gradients, a network in training mode, autocast, or arguments it does not trace run eagerly.

A trace holds the network's Python-level choices as they were when it was recorded: which adapters are active,
their scales, merged or not, the attention processors. Only the weights' values may change afterwards, as they do
for the Self-NPO teacher; a network whose settings change between calls must not be called through one.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor


class _Call(torch.nn.Module):
    """`unet(sample, t, encoder_hidden_states, added_cond_kwargs)[0]` with tensor arguments only (what a trace
    takes); SDXL's pooled `text_embeds` and `time_ids` travel as two more tensors."""

    def __init__(self, net: torch.nn.Module, sdxl: bool):
        super().__init__()
        self.net, self.sdxl = net, sdxl

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, *extra: Tensor) -> Tensor:
        added = {"text_embeds": extra[0], "time_ids": extra[1]} if self.sdxl else None
        return self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                        return_dict=False)[0]


class TracedDenoiser(torch.nn.Module):
    """Calls `net` (a diffusers UNet, called as `ModelFamily.predict` calls it) through per-shape traces.

    `recorded` counts the traces made, `replayed` the calls served by one, `eager` the calls run as usual.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self._traces: dict[tuple, Any] = {}  # shape key -> trace, or None where the replay differed
        self.recorded = self.replayed = self.eager = 0

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                added_cond_kwargs: Optional[dict] = None, return_dict: bool = False, **kwargs: Any):
        extra = self._extra(added_cond_kwargs)
        if (kwargs or return_dict or extra is None or torch.is_grad_enabled() or self.net.training
                or not torch.is_tensor(timestep) or encoder_hidden_states is None
                or torch.is_autocast_enabled(sample.device.type)):
            self.eager += 1
            return self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                            added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
        inputs = (sample, timestep, encoder_hidden_states, *extra)
        trace = self._trace_for(inputs)
        if trace is None:
            self.eager += 1
            return (_Call(self.net, bool(extra))(*inputs),)
        self.replayed += 1
        return (trace(*inputs),)

    def _trace_for(self, inputs: tuple[Tensor, ...]):
        """The trace to replay for these inputs, or None to run them eagerly. One trace serves every batch size of
        the same per-row shapes; each new batch size is checked once against the eager call, and a size whose
        replay differs gets a trace of its own (or runs eagerly if that differs too)."""
        rows = tuple((tuple(x.shape[1:]), x.dtype, x.device) for x in inputs)
        size = (rows, tuple(x.shape[0] for x in inputs))
        if size in self._traces:
            return self._traces[size]
        shared = self._traces.get(rows)
        if shared is not None and self._same_as_eager(shared, inputs):
            self._traces[size] = shared
            return shared
        trace = self._record(inputs)
        self._traces[size] = trace
        self._traces.setdefault(rows, trace)
        return trace

    @staticmethod
    def _extra(added_cond_kwargs: Optional[dict]) -> Optional[tuple[Tensor, ...]]:
        """() without added conditioning, (text_embeds, time_ids) for SDXL's, None for anything else."""
        if not added_cond_kwargs:
            return ()
        if set(added_cond_kwargs) == {"text_embeds", "time_ids"}:
            return added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        return None

    def _same_as_eager(self, trace, inputs: tuple[Tensor, ...]) -> bool:
        return torch.equal(trace(*inputs), _Call(self.net, len(inputs) > 3)(*inputs))

    def _record(self, inputs: tuple[Tensor, ...]):
        """A trace of one call on these inputs, or None when its replay is not bit-identical to the eager call."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values taken as constants: checked below
            trace = torch.jit.trace(_Call(self.net, len(inputs) > 3), inputs, check_trace=False)
        self.recorded += 1
        if self._same_as_eager(trace, inputs):
            return trace
        warnings.warn(f"the traced network call differs from the eager one for inputs of shapes "
                      f"{[tuple(x.shape) for x in inputs]}; these calls run eagerly", stacklevel=4)
        return None
