"""Evaluation: benchmark statistics, set-level measures (FD, precision, recall; `distribution`,
`toy_distribution`), and `evaluate_folders` / `write_report` behind `diffalign evaluate`. The reward models
(`diffalign.rewards`) are re-exported here."""

from ..rewards import (
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
from .distribution import (
    DistributionDifference,
    DistributionMetrics,
    distribution_metrics,
    feature_frechet_distance,
    frechet_distance,
    paired_distribution_difference,
    precision_recall,
)
from .evaluate import evaluate_folders
from .report import format_table, write_report
from .result import EvaluationResult, ImageRecord
from .stats import Interval, WinRate, bootstrap_ci, paired_win_rate, win_rate
from .toy_distribution import ToyDistribution, compare_toy_distributions, toy_distribution_metrics

__all__ = [
    "DistributionDifference", "DistributionMetrics", "EvaluationResult", "ImageRecord", "Interval", "Reward",
    "RewardSpec", "ToyDistribution", "ToyReward", "WinRate", "available_rewards", "bootstrap_ci",
    "compare_toy_distributions", "distribution_metrics", "evaluate_folders", "feature_frechet_distance",
    "format_table", "frechet_distance", "get_reward", "images_to_pil", "images_to_tensor",
    "paired_distribution_difference", "paired_win_rate", "parse_reward_spec", "precision_recall",
    "register_reward", "toy_distribution_metrics", "win_rate", "write_report",
]
