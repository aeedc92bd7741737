"""Rewards by name: `get_reward(spec)` builds one from a spec string

    NAME[=PATH][:KEY=VALUE]...      e.g.  toy   pickscore=/models/pick:processor=/models/clip-h

where PATH is a local folder/file or hub id and the KEY=VALUE options are the ones the reward declares
(an option starts at a ':' followed by a word and '=', so 'C:\\models' stays one path). Rewards register
themselves with `@register_reward("name", options=(...))`: toy in `toy`, pickscore/clip/aesthetic in `clip`,
hpsv2/imagereward in `optional` (the package imports all three).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .base import Reward


@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: `NAME[=PATH][:KEY=VALUE]...`."""

    name: str
    path: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = self.name + (f"={self.path}" if self.path else "")
        return text + "".join(f":{k}={v}" for k, v in self.options.items())


# An option begins at ':' followed by an identifier and '='; any other ':' belongs to the path.
_OPTION_START = re.compile(r":(?=[A-Za-z_]\w*=)")


def parse_reward_spec(spec: str) -> RewardSpec:
    head, *option_texts = _OPTION_START.split(str(spec).strip())
    name, _, path = head.partition("=")
    options: dict[str, str] = {}
    for text in option_texts:
        key, _, value = text.partition("=")
        if key in options:
            raise UserError(f"reward spec '{spec}' gives option '{key}' twice: keep one")
        options[key] = value.strip()
    if not name.strip():
        raise UserError(f"reward spec '{spec}' has no name: write NAME[=PATH][:KEY=VALUE], e.g. toy or pickscore=FOLDER")
    return RewardSpec(name.strip(), path.strip() or None, options)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Reward]
    options: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_reward(name: str, options: Sequence[str] = ()):
    """Decorator: `factory(path_or_None, *, device, batch_size, **options) -> Reward` becomes available as
    `get_reward("name[=PATH][:option=VALUE]")`. `options` lists the spec options the factory accepts;
    `device`/`batch_size` are None unless the caller chose them (the factory's defaults apply)."""

    def wrap(factory):
        _REGISTRY[name] = _Entry(factory, tuple(options))
        return factory

    return wrap


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(spec: str | RewardSpec, device: str | torch.device | None = None, batch_size: int | None = None) -> Reward:
    """Build a reward from a spec (see the module docstring), e.g. `toy`, `toy=/path/to/judge`,
    `aesthetic=/models/clip-l14:head=/models/head.pth`."""
    parsed = spec if isinstance(spec, RewardSpec) else parse_reward_spec(spec)
    entry = _REGISTRY.get(parsed.name)
    if entry is None:
        raise UserError(f"unknown reward '{parsed.name}': known rewards are {', '.join(available_rewards())} "
                        "(spec: NAME[=PATH][:KEY=VALUE])")
    unknown = sorted(set(parsed.options) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise UserError(f"reward '{parsed.name}' has no option {', '.join(map(repr, unknown))} (in spec '{parsed}'); "
                        f"its options: {allowed}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"reward batch size must be at least 1, got {batch_size}")
    reward = entry.factory(parsed.path, device=device, batch_size=batch_size, **parsed.options)
    reward.spec = str(parsed)
    return reward


__all__ = ["RewardSpec", "available_rewards", "get_reward", "parse_reward_spec", "register_reward"]
