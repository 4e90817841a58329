"""The KVPO objective against a direct float64 transcription of DESIGN.md's formulas (loss and gradient)."""
import math

import pytest
import torch

from kvpo_kernels.trainer.objective import (anchor_relative_advantages, branch_log_likelihood, kvpo_loss,
                                            step_temperatures)


def _advantages_by_hand(local, global_, weights, signal_weights=(1.0, 0.5), clamp=2.5):
    """DESIGN.md, element by element in Python floats (rows: branches 0..G-1, then the anchor)."""
    G = local.shape[0] - 1
    total = [0.0] * G
    for rewards, signal_weight in zip((local.tolist(), global_.tolist()), signal_weights):
        signal = [0.0] * G
        for c in range(len(weights)):
            column = [row[c] for row in rewards]
            mean = sum(column) / (G + 1)
            std = math.sqrt(sum((x - mean) ** 2 for x in column) / G)  # sample std over G + 1 values
            for g in range(G):
                signal[g] += weights[c] * (column[g] - column[G]) / (std + 1e-8)
        mean = sum(signal) / G
        pop_std = math.sqrt(sum((x - mean) ** 2 for x in signal) / G)
        if pop_std > 1e-8:
            signal = [x / pop_std for x in signal]
        total = [t + signal_weight * x for t, x in zip(total, signal)]
    return [max(-clamp, min(clamp, t)) for t in total]


def _loss_by_hand(energy, energy_old, energy_ref, sigmas, advantages, beta, clip_low=0.1, clip_high=0.2):
    """The loss as a float64 autograd graph written straight from the formulas, with explicit sums."""
    G, NB, K = energy.shape
    tau = [max(float(s), 1.0) ** 2 for s in sigmas]

    def logl(E):
        return torch.stack([-sum(E[g, b, k] / (2 * tau[k]) for b in range(NB) for k in range(K)) for g in range(G)])

    def log_softmax(l):
        return l - torch.log(torch.exp(l).sum())

    log_pi, log_old, log_ref = log_softmax(logl(energy)), log_softmax(logl(energy_old)), log_softmax(logl(energy_ref))
    terms = []
    for g in range(G):
        r = torch.exp(torch.clamp(log_pi[g] - log_old[g], -20, 20))
        terms.append(torch.minimum(r * advantages[g], torch.clamp(r, 1 - clip_low, 1 + clip_high) * advantages[g]))
    policy = -sum(terms) / G
    kl = sum(torch.exp(log_pi[g]) * (log_pi[g] - log_ref[g]) for g in range(G))
    if any(a > 0 for a in advantages):
        s = 1.0
    else:
        # s is a constant of the update (pi_anchor = 1/2 whatever the logits): a number, not part of the graph.
        logits = torch.cat([log_pi, torch.zeros(1, dtype=torch.float64)]).tolist()
        s = 1 - math.exp(logits[-1]) / sum(math.exp(x) for x in logits)
    return s * (policy + beta * kl)


@pytest.mark.parametrize("G,C", [(4, 1), (7, 3)])
def test_advantages_match_formula(G, C):
    local = torch.randn(G + 1, C, dtype=torch.float64)
    global_ = torch.randn(G + 1, C, dtype=torch.float64)
    weights = torch.rand(C, dtype=torch.float64) + 0.5
    got = anchor_relative_advantages(local, global_, weights)
    want = torch.tensor(_advantages_by_hand(local, global_, weights.tolist()), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Anchor-relative, not mean-centred: a branch equal to the anchor in every signal gets exactly 0.
    local[0], global_[0] = local[-1], global_[-1]
    assert anchor_relative_advantages(local, global_, weights)[0].item() == 0.0


def test_advantages_flat_signal_and_clamp():
    G = 5
    # Every branch 1.0 above the anchor: the population std over branches is 0, so the signal keeps its scale.
    local = torch.cat([torch.ones(G, 1), torch.zeros(1, 1)]).double()
    adv = anchor_relative_advantages(local, local.clone(), None)
    assert torch.all(adv == adv[0]) and adv[0] > 0
    big = torch.cat([torch.full((G, 1), 1.0), torch.zeros(1, 1)]).double()
    big[0] = 100.0
    assert anchor_relative_advantages(big, big, None).abs().max() <= 2.5


@pytest.mark.parametrize("case", ["some_better", "all_worse", "far_from_old"])
def test_loss_and_gradient_match_formula(case):
    G, NB, K = 6, 2, 4
    sigmas = torch.tensor([1.0, 0.9375, 0.833, 0.625], dtype=torch.float64)
    sigmas[0] = 1.7  # one tau above 1 so that max(sigma, 1)^2 is exercised
    energy = (torch.rand(G, NB, K, dtype=torch.float64) * 2).requires_grad_()
    spread = 30.0 if case == "far_from_old" else 0.3  # far from old: ratios leave the clip range
    energy_old = energy.detach() + spread * torch.randn(G, NB, K, dtype=torch.float64)
    energy_ref = energy.detach() + 0.5 * torch.randn(G, NB, K, dtype=torch.float64)
    advantages = torch.randn(G, dtype=torch.float64)
    if case == "all_worse":
        advantages = -advantages.abs() - 0.1
    if case == "far_from_old":
        # Branch 0 surely clipped: far less likely under the old policy (ratio >> 1 + clip_high) and better than
        # the anchor, so the clipped term is the smaller one.
        energy_old[0] += 50.0
        advantages[0] = advantages[0].abs() + 0.1
    beta = 0.37

    tau = step_temperatures(sigmas)
    terms = kvpo_loss(branch_log_likelihood(energy, tau), branch_log_likelihood(energy_old, tau),
                      branch_log_likelihood(energy_ref, tau), advantages, beta=beta)
    (grad,) = torch.autograd.grad(terms.loss, energy)

    energy_hand = energy.detach().clone().requires_grad_()
    want = _loss_by_hand(energy_hand, energy_old, energy_ref, sigmas, advantages.tolist(), beta)
    (want_grad,) = torch.autograd.grad(want, energy_hand)

    torch.testing.assert_close(terms.loss.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert grad.abs().sum() > 0
    if case == "all_worse":
        assert terms.scale.item() == pytest.approx(0.5)
    if case == "far_from_old":
        assert 0 < terms.clip_fraction.item() <= 1


def test_loss_gradient_descends_energy_of_good_branches():
    """Sign check: with pi_old = pi, a positive-advantage branch's energy must get a positive gradient
    (descending the loss lowers its energy, raising its likelihood), a negative one a negative gradient."""
    G = 4
    energy = torch.rand(G, 1, 2, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([2.0, 1.0, -1.0, -2.0], dtype=torch.float64)
    tau = torch.ones(2, dtype=torch.float64)
    logl = branch_log_likelihood(energy, tau)
    terms = kvpo_loss(logl, logl.detach(), None, advantages, beta=0.0)
    (grad,) = torch.autograd.grad(terms.loss, energy)
    assert grad[0].sum() > 0 and grad[3].sum() < 0
