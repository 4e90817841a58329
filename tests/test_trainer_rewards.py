"""Built-in synthetic rewards: deterministic, the documented formulas, monotone where they should be."""
import pytest
import torch

from kvpo_kernels.trainer.rewards import (BrightnessReward, CombinedReward, LinearDecoder, RewardFn,
                                          TemporalSmoothnessReward, build_reward)


def test_brightness_reward_formula_and_monotonicity():
    reward = BrightnessReward(4, target=0.3, seed=5)
    latents = torch.randn(3, 4, 2, 6, 6)
    ids = torch.zeros(3, dtype=torch.long)
    decoder = LinearDecoder(4, seed=5)
    want = -(decoder(latents).mean(dim=(1, 2, 3, 4)) - 0.3).abs()
    torch.testing.assert_close(reward(latents, ids)[:, 0], want)
    assert isinstance(reward, RewardFn) and reward(latents, ids).shape == (3, 1)
    # Moving the latents along the decoder's brightness direction, from dark towards the target, raises the reward.
    direction = decoder.weight.sum(0).view(1, 4, 1, 1, 1)
    scores = [float(reward(latents * 0 - 2 * direction + s * direction, ids[:1])[0]) for s in (0.0, 0.5, 1.0)]
    assert scores[0] < scores[1] < scores[2]
    assert torch.equal(BrightnessReward(4, seed=5)(latents, ids), BrightnessReward(4, seed=5)(latents, ids))


def test_smoothness_reward_and_combination():
    smooth = TemporalSmoothnessReward(4, seed=1)
    still = torch.randn(1, 4, 1, 5, 5).expand(2, 4, 3, 5, 5).clone()
    flicker = still.clone()
    flicker[1, :, 1] += 3.0
    scores = smooth(flicker, torch.zeros(2, dtype=torch.long))[:, 0]
    assert scores[0].item() == 0.0 and scores[1] < 0
    both = CombinedReward([BrightnessReward(4), smooth])
    assert both.names == ("brightness", "smoothness")
    assert both(flicker, torch.zeros(2, dtype=torch.long)).shape == (2, 2)


def test_build_reward_from_config_entries():
    reward = build_reward([{"name": "brightness", "weight": 2.0, "target": -0.2}, {"name": "smoothness"}], 4, seed=0)
    assert reward.names == ("brightness", "smoothness") and reward.rewards[0].target == -0.2
    with pytest.raises(ValueError, match="unknown reward 'hpsv3'"):
        build_reward([{"name": "hpsv3"}], 4, seed=0)
