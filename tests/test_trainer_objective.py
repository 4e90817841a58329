"""The KVPO objective against our own float64 transcription of the released training code
(Richard-Zhang-AI/KVPO ``models/longlive/trainer/kvpo.py``; docs/recipe.md cites the lines): advantages, the anchor
protection trigger (mechanism_2), the loss and d loss / d energies on random groups and on the edge cases."""
import math

import pytest
import torch

from kvpo_kernels.trainer.objective import (anchor_is_beaten, anchor_relative_advantages, branch_log_likelihood,
                                            kvpo_loss, step_temperatures)

EPS = 1e-8


# ------------------------------------------------------------------ the released code, transcribed element by element
def _released_component_advantage(branch, anchor):
    """_anchor_advantage: (r_g - r_a) / (torch.std over the G + 1 rewards, i.e. the SAMPLE std, + 1e-8)."""
    values = branch + [anchor]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
    return [(x - anchor) / (std + EPS) for x in branch]


def _released_fusion_std(signal):
    """_normalize_advantage_for_fusion, mode "std": population std; kept as is when <= 1e-8, else / (std + 1e-8)."""
    mean = sum(signal) / len(signal)
    std = math.sqrt(sum((x - mean) ** 2 for x in signal) / len(signal))
    return list(signal) if std <= EPS else [x / (std + EPS) for x in signal]


def _released_advantages(local, global_, weights, signal_weights=(1.0, 0.5), clamp=2.5):
    """_aggregate_component_advantages per signal, _fuse_signal_advantages, then the adv_clip_max clamp."""
    G = len(local) - 1
    fused = [0.0] * G
    for rewards, signal_weight in zip((local, global_), signal_weights):
        signal = [0.0] * G
        for c, weight in enumerate(weights):
            column = [row[c] for row in rewards]
            for g, a in enumerate(_released_component_advantage(column[:G], column[G])):
                signal[g] += weight * a
        fused = [f + signal_weight * x for f, x in zip(fused, _released_fusion_std(signal))]
    return [max(-clamp, min(clamp, f)) for f in fused]


def _released_safe(local, global_, weights):
    """train_step's PROTECT trigger: any raw weighted branch reward > the anchor's, on global OR local."""
    def weighted(row):
        return sum(w * x for w, x in zip(weights, row))
    return any(any(weighted(row) > weighted(rewards[-1]) for row in rewards[:-1]) for rewards in (local, global_))


def _released_loss(energy, energy_old, energy_ref, sigmas, advantages, safe, beta, clip_low=0.1, clip_high=0.2):
    """_compute_trajectory_log_prob (log p = -sum mse / (2 max(sigma, 1)^2)), then
    _compute_policy_objective_from_logits with mechanism_2 and the discrete KL, as a float64 autograd graph."""
    G, NB, K = energy.shape

    def logits(E):
        return torch.stack([sum(-E[g, b, k] / (2 * max(float(sigmas[k]), 1.0) ** 2)
                                for b in range(NB) for k in range(K)) for g in range(G)])

    def log_softmax(l):
        return l - torch.logsumexp(l, 0)

    l_theta, l_old, l_ref = logits(energy), logits(energy_old).detach(), logits(energy_ref).detach()
    ratio = torch.exp(torch.clamp(log_softmax(l_theta) - log_softmax(l_old), -20.0, 20.0))
    terms = [torch.minimum(ratio[g] * advantages[g], torch.clamp(ratio[g], 1 - clip_low, 1 + clip_high) * advantages[g])
             for g in range(G)]
    loss_grpo = -sum(terms) / G
    anchor_logit = torch.tensor([-math.inf if safe else 0.0], dtype=torch.float64)
    pi_full = torch.softmax(torch.cat([log_softmax(l_theta), anchor_logit]), 0)
    scale = 1.0 - pi_full[-1]  # (its gradient is 0: pi_anchor = 1/2 whatever the logits)
    pi = torch.exp(log_softmax(l_theta))
    kl = (pi * (torch.log(pi + 1e-10) - log_softmax(l_ref))).sum()
    clip_fraction = sum(float(abs(r - min(max(r, 1 - clip_low), 1 + clip_high)) > 1e-6) for r in ratio.tolist()) / G
    return scale * (loss_grpo + beta * kl), scale.item(), clip_fraction


# ------------------------------------------------------------------------------------------------------- groups
def _random_group(G, C):
    return torch.randn(G + 1, C, dtype=torch.float64), torch.randn(G + 1, C, dtype=torch.float64)


def _edge_group(case):
    """(local, global) [G + 1, 1] rewards (anchor last) for the named edge cases."""
    column = {
        # every branch worse than the anchor on both signals
        "all_worse": ([-1.0, -0.5, -2.0, -0.1, 0.0], [-0.3, -0.2, -1.0, -0.4, 0.0]),
        # branch 0 beats the anchor on the local signal only and every fused advantage is < 0 (the fused decision
        # would halve this update; the released rule, raw rewards, keeps it whole)
        "local_only_gain": ([0.01, -1.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0, 0.0]),
        # no reward signal at all: every std is 0, every advantage 0
        "zero_std": ([0.7] * 5, [0.7] * 5),
        "G2": ([0.4, -0.2, 0.1], [0.3, 0.5, 0.0]),
        # branch 0 ties the anchor exactly on both signals, the rest are worse: a tie is no win (released ">")
        "tie": ([0.5, 0.2, -0.3, 0.5], [1.0, 0.1, 0.9, 1.0]),
    }[case]
    local, global_ = (torch.tensor(v, dtype=torch.float64).unsqueeze(1) for v in column)
    return local, global_


def _check_against_released(local, global_, weights, beta=10.0, spread=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G, NB, K = local.shape[0] - 1, 2, 4
    sigmas = torch.tensor([1.7, 0.9375, 0.833, 0.625], dtype=torch.float64)  # 1.7: max(sigma, 1)^2 is exercised
    energy = (torch.rand(G, NB, K, dtype=torch.float64, generator=gen) * 2).requires_grad_()
    energy_old = energy.detach() + spread * torch.randn(G, NB, K, dtype=torch.float64, generator=gen)
    energy_ref = energy.detach() + 0.5 * torch.randn(G, NB, K, dtype=torch.float64, generator=gen)

    advantages = anchor_relative_advantages(local, global_, weights)
    want_adv = _released_advantages(local.tolist(), global_.tolist(), weights.tolist())
    torch.testing.assert_close(advantages, torch.tensor(want_adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    safe = anchor_is_beaten(local, global_, weights)
    assert safe == _released_safe(local.tolist(), global_.tolist(), weights.tolist())

    tau = step_temperatures(sigmas)
    terms = kvpo_loss(branch_log_likelihood(energy, tau), branch_log_likelihood(energy_old, tau),
                      branch_log_likelihood(energy_ref, tau), advantages, anchor_beaten=safe, beta=beta)
    (grad,) = torch.autograd.grad(terms.loss, energy)
    energy_hand = energy.detach().clone().requires_grad_()
    want, want_scale, want_clip = _released_loss(energy_hand, energy_old, energy_ref, sigmas, want_adv, safe, beta)
    (want_grad,) = torch.autograd.grad(want, energy_hand)
    # The released KL takes log(pi + 1e-10), ours the exact log_softmax: ~beta * 1e-10 / pi apart, far below 1e-7.
    torch.testing.assert_close(terms.loss.detach(), want.detach(), rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(grad, want_grad, rtol=1e-7, atol=1e-8)
    assert terms.scale.item() == pytest.approx(want_scale, abs=1e-15)
    assert terms.clip_fraction.item() == pytest.approx(want_clip)
    assert grad.abs().sum() > 0
    return terms, safe


@pytest.mark.parametrize("trial", range(6))
def test_loss_and_gradient_match_released_on_random_groups(trial):
    G, C = [(4, 1), (7, 3), (2, 2), (8, 1), (5, 2), (3, 1)][trial]
    torch.manual_seed(1000 + trial)
    local, global_ = _random_group(G, C)
    weights = torch.rand(C, dtype=torch.float64) + 0.5
    _check_against_released(local, global_, weights, spread=[0.3, 3.0][trial % 2], seed=trial)


@pytest.mark.parametrize("case, safe, scale", [("all_worse", False, 0.5), ("local_only_gain", True, 1.0),
                                               ("zero_std", False, 0.5), ("G2", True, 1.0), ("tie", False, 0.5)])
def test_loss_and_gradient_match_released_on_edge_groups(case, safe, scale):
    local, global_ = _edge_group(case)
    terms, got_safe = _check_against_released(local, global_, torch.ones(1, dtype=torch.float64))
    assert got_safe is safe and terms.scale.item() == scale
    if case == "local_only_gain":  # the case where a decision on the fused advantage would differ
        assert (anchor_relative_advantages(local, global_) < 0).all()
    if case == "zero_std":
        assert torch.equal(anchor_relative_advantages(local, global_), torch.zeros(4, dtype=torch.float64))


def test_anchor_protection_tie_is_not_a_win():
    """Released rule `rewards > anchor` (strict): a branch exactly equal to the anchor does not make the group safe,
    on either signal; the smallest step above it does. The weighted sum over components decides, not each one."""
    local = torch.tensor([[0.5], [0.2], [0.5]], dtype=torch.float64)
    below = torch.tensor([[0.1], [0.2], [0.3]], dtype=torch.float64)
    assert not anchor_is_beaten(local, below)
    assert not anchor_is_beaten(below, local)
    above = local.clone()
    above[0, 0] = math.nextafter(0.5, 1.0)
    assert anchor_is_beaten(above, below) and anchor_is_beaten(below, above)
    # component 0 better, component 1 worse by more: the raw weighted reward is below the anchor's
    two = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    assert not anchor_is_beaten(two, two)
    assert anchor_is_beaten(two, two, torch.tensor([1.0, 0.1], dtype=torch.float64))


def test_flat_signal_keeps_the_sample_std_scale():
    """Every branch 1.0 above the anchor: the fusion leaves the flat signal as is, so the per-component std is
    visible in the value: (1 - 0) / (sample std of [1, 1, 1, 1, 0] + 1e-8) = 1 / sqrt(0.2) = sqrt(5), not the
    population std's 1 / 0.4 = 2.5."""
    local = torch.tensor([[1.0]] * 4 + [[0.0]], dtype=torch.float64)
    adv = anchor_relative_advantages(local, local.clone(), signal_weights=(1.0, 0.0), clamp=10.0)
    assert adv.tolist() == pytest.approx([1.0 / (math.sqrt(0.2) + 1e-8)] * 4, rel=1e-15)
    both = anchor_relative_advantages(local, local, clamp=10.0)  # local weight 1 + global weight 0.5
    assert both[0].item() == pytest.approx(1.5 / (math.sqrt(0.2) + 1e-8))
    # clamped to +-2.5 by default
    assert anchor_relative_advantages(local, local).tolist() == [2.5] * 4


def test_fusion_divides_by_std_plus_eps():
    """Released fusion: signal / (population std + 1e-8). Two branches 3e-8 apart, both far above the anchor: the
    signal's spread is 2.6e-8, so the + 1e-8 changes the result by a factor 0.72 (4.8e7 instead of 6.7e7)."""
    local = torch.tensor([[1.0], [1.0 + 3e-8], [0.0]], dtype=torch.float64)
    zeros = torch.zeros(3, 1, dtype=torch.float64)
    got = anchor_relative_advantages(local, zeros, signal_weights=(1.0, 0.0), clamp=1e9)
    want = _released_advantages(local.tolist(), zeros.tolist(), [1.0], (1.0, 0.0), 1e9)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)
    assert 4.7e7 < got[0].item() < 4.9e7


def test_ratio_statistics_and_clip_fraction():
    """clip_fraction counts ratios outside [1 - clip_low, 1 + clip_high] (released definition), ratio_min/max/mean
    are those of the G ratios."""
    logl_old = torch.zeros(4, dtype=torch.float64)
    logl = torch.log(torch.tensor([0.25 * 1.5, 0.25 * 1.1, 0.25 * 0.8, 0.25 * 0.6], dtype=torch.float64))
    terms = kvpo_loss(logl, logl_old, None, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64),
                      anchor_beaten=True)
    assert terms.ratio_max.item() == pytest.approx(1.5) and terms.ratio_min.item() == pytest.approx(0.6)
    assert terms.ratio_mean.item() == pytest.approx(1.0)
    assert terms.clip_fraction.item() == 0.75  # 1.5, 0.8 and 0.6 lie outside [0.9, 1.2]; 1.1 inside


def test_loss_gradient_descends_energy_of_good_branches():
    """Sign check: with pi_old = pi, a positive-advantage branch's energy must get a positive gradient
    (descending the loss lowers its energy, raising its likelihood), a negative one a negative gradient."""
    G = 4
    energy = torch.rand(G, 1, 2, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([2.0, 1.0, -1.0, -2.0], dtype=torch.float64)
    tau = torch.ones(2, dtype=torch.float64)
    logl = branch_log_likelihood(energy, tau)
    terms = kvpo_loss(logl, logl.detach(), None, advantages, anchor_beaten=True, beta=0.0)
    (grad,) = torch.autograd.grad(terms.loss, energy)
    assert grad[0].sum() > 0 and grad[3].sum() < 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="anchor_beaten"):
        kvpo_loss(torch.zeros(2), torch.zeros(2), None, torch.zeros(2), anchor_beaten=1)
    with pytest.raises(ValueError, match="local_rewards"):
        anchor_is_beaten(torch.zeros(3, 1), torch.zeros(2, 1))
