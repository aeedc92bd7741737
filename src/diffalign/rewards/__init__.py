"""Reward models behind one interface: `Reward.score(images, prompts) -> Tensor[N]`, higher is better.

`get_reward(spec)` builds one by name (`registry.py`: `NAME[=PATH][:KEY=VALUE]...`, e.g. `toy` or
`pickscore=/models/pick`). Used by evaluation (`diffalign evaluate`) and generation (the ranked recipe and the
pair filters of `diffalign pairs`); neither imports the other for it.
"""

from . import clip, optional, toy  # noqa: F401  (importing registers their rewards)
from .base import Reward, check_prompts, images_to_pil, images_to_tensor
from .registry import RewardSpec, available_rewards, get_reward, parse_reward_spec, register_reward
from .toy import ToyReward, ToyTermReward

__all__ = ["Reward", "RewardSpec", "ToyReward", "ToyTermReward", "available_rewards", "check_prompts", "get_reward",
           "images_to_pil", "images_to_tensor", "parse_reward_spec", "register_reward"]
