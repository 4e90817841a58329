"""Group rollouts (G routed branches + one anchor, batched) and their TVE replay.

Rollout of one group (one prompt), all under ``torch.no_grad()`` with the old policy's weights:

    prefix  blocks 0 .. fork-1      batch 1, generated once, committed into a cache (the pre-fork snapshot)
    fork    cache.fork(G + 1)       no K/V copy: every branch maps the prefix's blocks
    chunk   blocks fork .. end      G + 1 sequences in ONE batch; the first P blocks routed (branch g: route g,
                                    anchor: its default window), the rest unperturbed; the same initial and
                                    re-noising noise for every sequence, so only the routing differs

Replay of the G branches (the anchor is only a reward baseline): from the pre-fork snapshot forked into G sequences,
routing off, the policy predicts x0 at each recorded noisy input x_t; the trajectory energy of step k is

    "x0" (default; released kvpo.py _compute_trajectory_log_prob):  E[g, b, k] = w_k * mean_j (x0_theta - x0_rollout)^2
    "velocity" (option):  E[g, b, k] = w_k * mean_j (v_theta - v_rollout)^2 = w_k / sigma_k^2 * (the x0 residual)

(v = (x_t - x0) / sigma at the same x_t; w_k = energy_scale * step weight), computed by
:func:`kvpo_kernels.velocity_energy` for all K steps of a block at once (``replay.energy_space`` selects the form).
Each replayed block reads the branch's own history, as in the rollout: the rollout's clean blocks are committed
(no grad) into the replay cache first, and block i reads a snapshot taken just before block i's commit.
With ``rematerialize``, :func:`backward_through_replay` trades one extra forward per gradient step for holding only
one forward's activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .. import velocity_energy
from ..routing import chr_routes, uniform_routes

SAMPLERS = {"chr": chr_routes, "uniform": uniform_routes}


@dataclass
class GroupRollout:
    """One group's rollout. G branches then the anchor (index G) along every batch dimension.

    prefix_cache: the pre-fork snapshot (batch 1, blocks ``0 .. fork_block - 1`` committed).
    prefix: ``[1, C, fork_block * f, H, W]`` clean prefix latents.
    chunk: ``[G + 1, C, (num_blocks - fork_block) * f, H, W]`` clean latents from the fork to the end.
    x_t, x0_pred: ``[NC, K, G + 1, C, f, H, W]`` the noisy input and the predicted x0 of every chunk block (NC of
    them), step and sequence. routes: the G branch routes (absolute frame indices). sigmas: ``[K]``.
    prompt_embeds: ``[1, L, D]``; prompt_id: index into the trainer's prompts.
    """
    fork_block: int
    perturbed_blocks: int
    prefix_cache: object
    prefix: torch.Tensor
    chunk: torch.Tensor
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    routes: List[List[int]]
    sigmas: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_id: int

    @property
    def num_branches(self) -> int:
        return self.chunk.shape[0] - 1

    def video(self) -> torch.Tensor:
        """``[G + 1, C, F, H, W]``: the whole video of every sequence (shared prefix + its own chunk)."""
        return torch.cat([self.prefix.expand(self.chunk.shape[0], -1, -1, -1, -1), self.chunk], dim=2)


def block_noise(generator: torch.Generator, num_steps: int, shape: Sequence[int]) -> List[torch.Tensor]:
    """``num_steps`` CPU float32 tensors of ``shape``: the initial noise, then the re-noising noise of steps 1..K-1.

    Drawn on the CPU from a seeded generator so that a rollout is the same on any device and any number of ranks.
    """
    return [torch.randn(tuple(shape), generator=generator) for _ in range(num_steps)]


@torch.no_grad()
def group_rollout(gen, prompt_embeds: torch.Tensor, *, prompt_id: int, num_blocks: int, fork_block: int,
                  perturbed_blocks: int, num_branches: int, num_routed: int, latent_shape: Sequence[int],
                  rng: torch.Generator, sampler: str = "chr") -> GroupRollout:
    """Roll out one group with the generator's current weights (the caller swaps in the old policy).

    gen: a :class:`~kvpo_kernels.integrations.diffusers.StreamingWanGenerator`; prompt_embeds ``[1, L, D]``;
    latent_shape ``(C, H, W)``; rng: CPU generator for the routes and every noise tensor.
    """
    cfg = gen.config
    f, steps = cfg.frames_per_block, len(gen.sigmas)
    channels, height, width = latent_shape
    param = next(gen.transformer.parameters())
    device, dtype = param.device, param.dtype
    shape = (1, channels, f, height, width)
    noises = [block_noise(rng, steps, shape) for _ in range(num_blocks)]

    def to_device(tensors, batch):
        return [t.to(device=device, dtype=dtype).expand(batch, -1, -1, -1, -1) for t in tensors]

    # One pool for the whole rollout, sized up front: the prefix's resident window plus every block the G + 1
    # sequences write after the fork (eviction frees none of those before the chunk ends). Growing on demand would
    # double the pool, copying it with old and new alive (at the 1.3B geometry, 287 MB per frame: 26 + 52 GB).
    # The replays later fork the same pool; the group's blocks are free again by then.
    cache = gen.new_cache(1, reserve_blocks=cfg.cache_frames + (num_branches + 1) * f * (num_blocks - fork_block))
    prefix = []
    for block in range(fork_block):
        noise = to_device(noises[block], 1)
        prefix.append(gen.generate_block(cache, block, noise[0], prompt_embeds, step_noise=noise[1:]).x0)
    prefix = torch.cat(prefix, dim=2) if prefix else prompt_embeds.new_zeros((1, channels, 0, height, width))

    pool = gen.route_pool(cache, fork_block, perturbed_blocks)
    routes = SAMPLERS[sampler](pool, num_branches, num_routed, generator=rng)
    batch = num_branches + 1
    branches = cache.fork(batch)
    embeds = prompt_embeds.expand(batch, -1, -1)
    chunk, x_t, x0_pred = [], [], []
    for block in range(fork_block, num_blocks):
        noise = to_device(noises[block], batch)
        block_routes = routes + [None] if block < fork_block + perturbed_blocks else None
        out = gen.generate_block(branches, block, noise[0], embeds, step_noise=noise[1:], routes=block_routes)
        chunk.append(out.x0)
        x_t.append(out.x_t)
        x0_pred.append(out.x0_pred)
    return GroupRollout(fork_block=fork_block, perturbed_blocks=perturbed_blocks, prefix_cache=cache, prefix=prefix,
                        chunk=torch.cat(chunk, dim=2), x_t=torch.stack(x_t), x0_pred=torch.stack(x0_pred),
                        routes=routes, sigmas=gen.sigmas.detach().float().cpu(), prompt_embeds=prompt_embeds,
                        prompt_id=prompt_id)


ENERGY_SPACES = ("x0", "velocity")


def _replay_setup(gen, rollout: GroupRollout, num_blocks: int, step_weights, energy_scale, energy_space):
    """sigmas [K], per-step energy weights [K], one cache per replayed block, prompt embeds [G, L, D].

    Every commit happens here, before any graph-recording forward: a commit writes the shared K/V pool in place,
    which would invalidate the pool tensors that an earlier block's forward saved for backward. So cache i is a
    snapshot (``select``: shared blocks, no copy) of the branches' history right before block i.
    """
    G, steps = rollout.num_branches, rollout.sigmas.numel()
    device = next(gen.transformer.parameters()).device
    sigmas = rollout.sigmas.to(device)
    weights = torch.ones(steps, device=device) if step_weights is None else step_weights.to(device)
    if energy_space not in ENERGY_SPACES:
        raise ValueError(f"energy_space must be one of {ENERGY_SPACES}, got {energy_space!r}")
    weights = energy_scale * weights
    if energy_space == "velocity":  # at the same x_t the velocity residual is the x0 residual divided by sigma
        weights = weights / sigmas.square()
    embeds = rollout.prompt_embeds.expand(G, -1, -1)
    f = gen.config.frames_per_block
    cache, caches = rollout.prefix_cache.fork(G), []
    for i in range(num_blocks):
        if i + 1 == num_blocks:
            caches.append(cache)
            break
        caches.append(cache.select(range(G)))
        with torch.no_grad():
            gen.commit_block(cache, rollout.fork_block + i, rollout.chunk[:G, :, i * f:(i + 1) * f], embeds)
    return sigmas, weights, caches, embeds


def replay_energies(gen, rollout: GroupRollout, *, num_blocks: int, grad_steps: int,
                    step_weights: Optional[torch.Tensor] = None, energy_scale: float = 1.0,
                    energy_space: str = "x0", backend: str = "auto") -> torch.Tensor:
    """Trajectory energies ``E [G, NB, K]`` (x0 or velocity residual: ``energy_space``) of the G branches under the
    generator's current weights.

    Replays the first ``num_blocks`` chunk blocks (the P perturbed ones, or all) with routing off from the pre-fork
    snapshot. Autograd records the first ``grad_steps`` steps of each block when grad mode is on; the later
    steps are computed without a graph (they still count in E, they just pass no gradient). step_weights ``[K]``
    (default 1) and energy_scale multiply each step's energy (with ``energy_space="velocity"`` also 1 / sigma_k^2).
    """
    G, steps = rollout.num_branches, rollout.sigmas.numel()
    sigmas, weights, caches, embeds = _replay_setup(gen, rollout, num_blocks, step_weights, energy_scale,
                                                   energy_space)
    energies = []
    for i, cache in enumerate(caches):
        block = rollout.fork_block + i
        preds = []
        for k in range(steps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k < grad_steps):
                preds.append(gen.predict_x0(cache, block, rollout.x_t[i, k, :G], sigmas[k], embeds))
        pred = torch.stack(preds, dim=1)                                  # [G, K, C, f, H, W]
        target = rollout.x0_pred[i, :, :G].transpose(0, 1)                # [G, K, C, f, H, W]
        energies.append(velocity_energy(pred, target, weights, reduction="mean", backend=backend))
    return torch.stack(energies, dim=1)                                   # [G, NB, K]


def backward_through_replay(gen, rollout: GroupRollout, energy_grad: torch.Tensor, *, grad_steps: int,
                            step_weights: Optional[torch.Tensor] = None, energy_scale: float = 1.0,
                            energy_space: str = "x0", backend: str = "auto") -> None:
    """Accumulate ``sum_{g,b,k} energy_grad[g, b, k] * dE[g, b, k]/dtheta`` into the parameters' ``.grad``.

    The memory-lean second pass of a replay: with ``energy_grad [G, NB, K]`` = dLoss/dE from a no-grad
    :func:`replay_energies` pass, it recomputes one (block, step) prediction at a time with a graph and back-propagates
    it at once, so only one forward's activations are alive (instead of NB x grad_steps of them). Costs one more
    forward per gradient step. Same gradient as back-propagating through a graph-recording replay.
    """
    G, num_blocks = rollout.num_branches, energy_grad.shape[1]
    sigmas, weights, caches, embeds = _replay_setup(gen, rollout, num_blocks, step_weights, energy_scale,
                                                   energy_space)
    for i, cache in enumerate(caches):
        block = rollout.fork_block + i
        for k in range(grad_steps):
            with torch.enable_grad():
                pred = gen.predict_x0(cache, block, rollout.x_t[i, k, :G], sigmas[k], embeds)
                energy = velocity_energy(pred.unsqueeze(1), rollout.x0_pred[i, k, :G].unsqueeze(1),
                                         weights[k:k + 1], reduction="mean", backend=backend)   # [G, 1]
                torch.autograd.backward(energy[:, 0], energy_grad[:, i, k].to(energy))
