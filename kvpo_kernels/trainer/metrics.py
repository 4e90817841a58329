"""The keys of a metrics.jsonl step row, defined once (the loop writes them, kvpo-plot and the docs read them).

metrics.jsonl holds one step row per step (rows of steps after the checkpoint a run resumes from are dropped and
written again as those steps are redone) and event rows without a ``step`` key: ``{"event": "start", "resumed_at",
"of_steps", "removed_leftovers", ...}`` at each start, ``{"event": "config_change", "at_step", "changes": {key:
[old, new]}}`` when a resume applies a config change (``--allow-config-change``).

Averaged over the step's groups and ranks (from the step's last update when ``optim.updates_per_rollout`` > 1):
"""
from __future__ import annotations

from typing import Dict

# Per-group values of the objective (kvpo_loss's terms).
LOSS_METRICS: Dict[str, str] = {
    "loss": "the KVPO loss", "policy_loss": "its clipped-ratio policy term", "kl": "KL(pi_theta || pi_ref)",
    "clip_fraction": "fraction of branch ratios outside the clip range", "ratio_mean": "mean branch ratio pi_theta /"
    " pi_old (!= 1 once the old policy lags: every second rollout by default)", "ratio_min": "min branch ratio",
    "ratio_max": "max branch ratio",
    "entropy": "entropy of the Gibbs branch policy", "scale": "anchor-protection scale",
}
# Per-group values of the data (rewards of the whole video, advantages, energies, fork block).
GROUP_METRICS: Dict[str, str] = {
    "reward_mean": "weighted whole-video reward, group mean", "reward_anchor": "... of the anchor",
    "reward_best": "... of the best branch", "advantage_mean": "mean advantage", "advantage_abs": "mean |advantage|",
    "energy_mean": "mean trajectory energy (replay.energy_space)", "fork_block": "fork block",
}
AVERAGED_METRICS = (*LOSS_METRICS, *GROUP_METRICS)
# Per-step values, the same on every rank.
STEP_METRICS: Dict[str, str] = {
    "step": "train step (1-based)", "grad_norm": "global gradient norm before clipping", "lr": "learning rate",
    "skipped": "true when the step was skipped (non-finite loss or gradient)", "skip_reason": "why (skipped rows)",
    "time_s": "wall time of the step", "old_is_policy": "the rollout policy was the policy itself",
    "local_groups": "groups rolled out on rank 0",
}
# Only in the rows of the steps that wrote a sample video (run.sample_every).
SAMPLE_METRICS: Dict[str, str] = {
    "sample_reward_anchor": "weighted reward of the sample video's anchor", "sample_reward_best": "... of its best "
    "branch", "sample_reward_worst": "... of its worst branch",
}
STEP_KEYS = (*STEP_METRICS, *AVERAGED_METRICS)

__doc__ += "".join(f"\n    {key:15s} {text}" for key, text in {**LOSS_METRICS, **GROUP_METRICS}.items())
__doc__ += "\n\nPer step:" + "".join(f"\n    {key:15s} {text}" for key, text in STEP_METRICS.items())
__doc__ += "\n\nSteps with a sample video:" + "".join(f"\n    {key:20s} {text}" for key, text in SAMPLE_METRICS.items())
