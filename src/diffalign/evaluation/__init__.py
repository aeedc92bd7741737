"""Evaluation: reward models behind one interface (`Reward.score(images, prompts) -> Tensor[N]`)."""

from .rewards import Reward, ToyReward, available_rewards, get_reward, images_to_tensor, register_reward

__all__ = ["Reward", "ToyReward", "available_rewards", "get_reward", "images_to_tensor", "register_reward"]
