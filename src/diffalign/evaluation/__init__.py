"""Evaluation: reward models behind one interface (`Reward.score(images, prompts) -> Tensor[N]`),
benchmark statistics, and `evaluate_folders` / `write_report` behind `diffalign evaluate`."""

from . import clip_rewards, optional_rewards  # noqa: F401  (importing registers their rewards)
from .evaluate import EvaluationResult, ImageRecord, evaluate_folders
from .report import format_table, write_report
from .rewards import (
    Reward,
    RewardSpec,
    ToyReward,
    available_rewards,
    get_reward,
    images_to_pil,
    images_to_tensor,
    parse_reward_spec,
    register_reward,
)
from .stats import Interval, WinRate, bootstrap_ci, paired_win_rate, win_rate

__all__ = [
    "EvaluationResult", "ImageRecord", "Interval", "Reward", "RewardSpec", "ToyReward", "WinRate",
    "available_rewards", "bootstrap_ci", "evaluate_folders", "format_table", "get_reward", "images_to_pil",
    "images_to_tensor", "paired_win_rate", "parse_reward_spec", "register_reward", "win_rate", "write_report",
]
