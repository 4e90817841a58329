"""Thin KVPO GRPO trainer on the group KV cache, the route samplers and the diffusers streaming generator.

    kvpo-train --preset tiny            # random 2-layer Wan, synthetic reward, CPU, about a minute
    kvpo-train --config run.yaml        # your own; see config.py for every field
    kvpo-plot runs/kvpo/metrics.jsonl -o curves.png
    kvpo-train --config configs/longlive_kvpo.yaml   # LoRA on LongLive, UMT5 prompts, Wan VAE + CLIP reward
    kvpo-eval runs/longlive_kvpo        # initial vs trained: mean reward per component on fixed prompts and seeds

From Python: ``Trainer(load_config("tiny"), reward_fn=my_reward).train()``.
"""
from .config import PRESETS, TrainConfig, load_config
from .loop import Trainer
from .objective import anchor_relative_advantages, branch_log_likelihood, kvpo_loss, step_temperatures
from .rewards import BrightnessReward, CombinedReward, LinearDecoder, RewardFn, TemporalSmoothnessReward

__all__ = ["PRESETS", "TrainConfig", "load_config", "Trainer", "anchor_relative_advantages", "branch_log_likelihood",
           "kvpo_loss", "step_temperatures", "RewardFn", "BrightnessReward", "TemporalSmoothnessReward",
           "CombinedReward", "LinearDecoder"]
