"""The KVPO objective (DESIGN.md, "The KVPO objective"): small tensors, plain PyTorch.

Conventions used throughout the trainer: a group has G routed branches and one unperturbed anchor; tensors over
the group's samples are ``[G + 1, ...]`` with the anchor LAST (index G); tensors over branches only are ``[G, ...]``.

    energies E [G, NB, K]  (NB replayed blocks, K denoising steps)  --branch_log_likelihood-->  l [G]
    rewards  R [G + 1, C]  per signal (local chunk, global video)     --anchor_relative_advantages-->  A [G]
    l_theta, l_old, l_ref, A  --kvpo_loss-->  scalar loss (+ statistics)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def step_temperatures(sigmas: torch.Tensor) -> torch.Tensor:
    """``tau_k = max(sigma_k, 1)^2`` (the released code's choice: 1 for every sigma <= 1). sigmas ``[K]`` -> ``[K]``."""
    return sigmas.clamp(min=1.0).square()


def branch_log_likelihood(energy: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``l[g] = -sum_{b,k} E[g, b, k] / (2 * tau_k)``.

    energy: ``[G, NB, K]`` (or ``[G, K]``), the trajectory energy of branch g's block b at step k (by default the
    released x0 residual ``mean (x0_rollout - x0_replay)^2``; see ``replay.energy_space``); tau: ``[K]``.
    Returns ``[G]`` in energy's dtype.
    """
    return -(energy / (2.0 * tau.to(energy))).flatten(1).sum(1)


def anchor_relative_advantages(local_rewards: torch.Tensor, global_rewards: torch.Tensor,
                               component_weights: Optional[torch.Tensor] = None, *,
                               signal_weights: Sequence[float] = (1.0, 0.5), clamp: float = 2.5,
                               eps: float = 1e-8) -> torch.Tensor:
    """Advantages of the G branches relative to the anchor (released ``kvpo.py``: ``_anchor_advantage``,
    ``_aggregate_component_advantages``, ``_normalize_advantage_for_fusion`` mode "std", ``adv_clip_max``).

    local_rewards, global_rewards: ``[G + 1, C]`` (anchor last): C reward components of the perturbed chunk ("local")
    and of the whole video ("global"); component_weights: ``[C]`` (default: all 1). Per signal and component,
    ``A_g = (R_g - R_anchor) / (std(R_1..R_G, R_anchor) + eps)`` with the sample std over the G + 1 rewards, then the
    weighted sum over components; each signal is divided by ``(its population std over the G branches) + eps``
    (left as is when that std <= eps), the signals are weighted by ``signal_weights`` and summed, and the result is
    clamped to ``+-clamp``. No mean-centring: the sign says better or worse than the anchor. Returns ``[G]``.
    """
    _check_rewards(local_rewards, global_rewards)
    if component_weights is None:
        component_weights = torch.ones(local_rewards.shape[1], dtype=local_rewards.dtype, device=local_rewards.device)
    total = torch.zeros(local_rewards.shape[0] - 1, dtype=local_rewards.dtype, device=local_rewards.device)
    for rewards, signal_weight in zip((local_rewards, global_rewards), signal_weights):
        per_component = (rewards[:-1] - rewards[-1:]) / (rewards.std(dim=0, unbiased=True) + eps)  # [G, C]
        signal = (per_component * component_weights.to(rewards)).sum(1)  # [G]
        spread = signal.std(unbiased=False)
        # A flat signal (every branch equally far from the anchor) keeps its scale instead of exploding.
        signal = torch.where(spread > eps, signal / (spread + eps), signal)
        total = total + signal_weight * signal
    return total.clamp(-clamp, clamp)


def anchor_is_beaten(local_rewards: torch.Tensor, global_rewards: torch.Tensor,
                     component_weights: Optional[torch.Tensor] = None) -> bool:
    """The released anchor-protection trigger (``per_step_protect_mode: mechanism_2``, ``kvpo.py`` train_step):
    True ("safe") when some branch's RAW weighted reward ``sum_c w_c R[g, c]`` is strictly greater (``>``: a tie
    is not a win) than the anchor's on the local OR the global signal. Shapes as :func:`anchor_relative_advantages`.
    """
    _check_rewards(local_rewards, global_rewards)
    if component_weights is None:
        component_weights = torch.ones(local_rewards.shape[1], dtype=local_rewards.dtype, device=local_rewards.device)
    for rewards in (local_rewards, global_rewards):
        weighted = (rewards * component_weights.to(rewards)).sum(1)  # [G + 1]
        if bool((weighted[:-1] > weighted[-1]).any()):
            return True
    return False


def _check_rewards(local_rewards: torch.Tensor, global_rewards: torch.Tensor) -> None:
    if local_rewards.shape != global_rewards.shape or local_rewards.dim() != 2 or local_rewards.shape[0] < 2:
        raise ValueError(f"local_rewards and global_rewards must both be [G + 1, C] with G >= 1, got "
                         f"{tuple(local_rewards.shape)} and {tuple(global_rewards.shape)}")


@dataclass
class LossTerms:
    """What one KVPO loss evaluation produced (every field a 0-dim tensor; ``loss`` carries the graph)."""
    loss: torch.Tensor
    policy_loss: torch.Tensor     # -mean_g min(r A, clip(r) A)
    kl: torch.Tensor              # KL(pi_theta || pi_ref) over the G branches
    scale: torch.Tensor           # s: 1, or 1 - pi_anchor when no branch beats the anchor
    clip_fraction: torch.Tensor   # fraction of branches whose ratio lies outside [1 - clip_low, 1 + clip_high]
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    entropy: torch.Tensor         # entropy of pi_theta (nats), how peaked the Gibbs branch policy is


def kvpo_loss(logl: torch.Tensor, logl_old: torch.Tensor, logl_ref: Optional[torch.Tensor], advantages: torch.Tensor,
              *, anchor_beaten: bool, clip_low: float = 0.1, clip_high: float = 0.2, beta: float = 0.0) -> LossTerms:
    """``s * (-mean_g min(r_g A_g, clip(r_g, 1 - clip_low, 1 + clip_high) A_g) + beta * KL(pi_theta || pi_ref))``.

    logl, logl_old, logl_ref: ``[G]`` branch log-likelihoods under the policy (with graph), the old (rollout) policy
    and the reference (initial) policy; logl_ref may be None when beta == 0. advantages: ``[G]``. anchor_beaten:
    :func:`anchor_is_beaten` of the group's rewards. ``pi = softmax_g(l)``,
    ``r_g = exp(clamp(log pi_theta - log pi_old, -20, 20))``, ``KL = sum_g pi_theta(g) (log pi_theta(g) -
    log pi_ref(g))``. ``s = 1`` when the anchor is beaten; otherwise (released mechanism_2) an anchor logit 0 joins
    ``log pi_theta(g)`` in one softmax and ``s = 1 - pi_anchor`` (= 0.5): when no branch beats the anchor the update
    is halved rather than pushing mass onto the least bad branch at full strength.
    """
    if not (logl.shape == logl_old.shape == advantages.shape) or logl.dim() != 1:
        raise ValueError(f"logl, logl_old and advantages must all be [G], got {tuple(logl.shape)}, "
                         f"{tuple(logl_old.shape)}, {tuple(advantages.shape)}")
    if beta != 0.0 and (logl_ref is None or logl_ref.shape != logl.shape):
        raise ValueError("logl_ref must be a [G] tensor when beta != 0")
    if not isinstance(anchor_beaten, bool):
        raise TypeError(f"anchor_beaten must be a bool, got {type(anchor_beaten).__name__}")
    log_pi = torch.log_softmax(logl, 0)
    log_pi_old = torch.log_softmax(logl_old.to(logl), 0)
    ratio = torch.exp(torch.clamp(log_pi - log_pi_old, -20.0, 20.0))
    advantages = advantages.to(logl)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    policy_loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages).mean()
    pi = log_pi.exp()
    if logl_ref is not None:
        kl = (pi * (log_pi - torch.log_softmax(logl_ref.to(logl), 0))).sum()
    else:
        kl = torch.zeros((), dtype=logl.dtype, device=logl.device)
    if anchor_beaten:
        scale = torch.ones((), dtype=logl.dtype, device=logl.device)
    else:
        # Its true gradient is zero (the pi_theta(g) sum to 1, so pi_anchor = 1/2 for any logits): detached, so
        # the softmax's rounding noise is not multiplied by a loss that can reach exp(20) * |A|.
        with_anchor = torch.cat([log_pi, log_pi.new_zeros(1)])
        scale = (1.0 - torch.softmax(with_anchor, 0)[-1]).detach()
    loss = scale * (policy_loss + beta * kl)
    # Released clip fraction: |r - clip(r)| > 1e-6, whatever the sign of A (how often the ratio leaves the range).
    outside = ((ratio - clipped_ratio).abs() > 1e-6).to(logl).mean()
    return LossTerms(loss=loss, policy_loss=policy_loss.detach(), kl=kl.detach(), scale=scale,
                     clip_fraction=outside.detach(), ratio_mean=ratio.mean().detach(),
                     ratio_min=ratio.min().detach(), ratio_max=ratio.max().detach(),
                     entropy=-(pi * log_pi).sum().detach())
