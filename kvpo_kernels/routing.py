"""KV route samplers: which older history frames each branch of a group attends to.

KVPO explores by routing history KV: every branch of a group sees the sink frames and its nearest frames, plus its
own subset of ``num_routed`` frames drawn from an *eligible pool* of older frames (LongLive: the 14 frames that stay
resident through the perturbed block for forks at frame >= 21; ``num_routed = window - sink - nearest = 12 - 3 - 4
= 5``). A route is a sorted list of absolute latent-frame indices; a sampler returns one route per branch.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch


def _validate(pool_frames: Sequence[int], num_branches: int, num_routed: int,
              generator: Optional[torch.Generator]) -> list[int]:
    if isinstance(pool_frames, torch.Tensor):
        if pool_frames.dim() != 1 or pool_frames.dtype.is_floating_point or pool_frames.dtype == torch.bool:
            raise TypeError(f"pool_frames must be a 1-D integer tensor or a sequence of ints, got "
                            f"{pool_frames.dtype} tensor of shape {tuple(pool_frames.shape)}")
        pool_frames = pool_frames.tolist()
    try:
        pool = list(pool_frames)
    except TypeError:
        raise TypeError(f"pool_frames must be a sequence of ints, got {type(pool_frames).__name__}") from None
    for frame in pool:
        if isinstance(frame, bool) or not isinstance(frame, numbers.Integral):
            raise TypeError(f"pool_frames must hold ints, got {frame!r} ({type(frame).__name__})")
        if frame < 0:
            raise ValueError(f"pool_frames must be non-negative frame indices, got {frame}")
    pool = [int(frame) for frame in pool]
    if len(set(pool)) != len(pool):
        raise ValueError(f"pool_frames must not repeat a frame, got {pool}")
    for name, value in (("num_branches", num_branches), ("num_routed", num_routed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}")
    if num_routed < 0:
        raise ValueError(f"num_routed must be >= 0, got {num_routed}")
    if num_routed > len(pool):
        raise ValueError(f"num_routed ({num_routed}) exceeds the eligible pool ({len(pool)} frames: {pool})")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (routes are sampled on the host), "
                         f"got one on {generator.device}")
    return pool


def chr_routes(pool_frames: Sequence[int], num_branches: int, num_routed: int, *,
               generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Causal-history routing (the KVPO sampler): shifted windows of one master permutation of the pool.

    One random permutation ``perm`` of the eligible pool is drawn per group (``torch.randperm`` with ``generator``);
    branch ``k`` takes ``perm[(k * shift + i) % P]`` for ``i < num_routed``, with ``P = len(pool_frames)`` and
    ``shift = max(1, P // num_branches)``, returned sorted. So the branches' routes are windows on one random cycle
    through the pool: consecutive branches share ``max(0, num_routed - shift)`` frames, and together the group
    covers ``(K - 1) * min(n, shift) + min(n, P - (K - 1) * shift)`` distinct frames when ``K = num_branches <= P``
    (each window adds its frames up to the next window's start; the last one up to the wrap back to the first),
    and all P frames when ``K > P`` (shift 1: the windows start at every position); every frame is covered when
    ``n >= shift`` and ``K * shift == P``. E.g. P = 14, K = 2, n = 5 (shift 7): 5 + 5 = 10 frames. Unlike
    independent uniform subsets, the routes do not cluster by chance.

    Example (LongLive geometry: pool of frames 6..19, 8 branches, 5 routed frames; pinned by the tests)::

        >>> chr_routes(range(6, 20), 8, 5, generator=torch.Generator().manual_seed(0))
        [[8, 9, 10, 12, 13], [8, 9, 12, 13, 17], [8, 12, 13, 15, 17], [8, 12, 15, 16, 17],
         [7, 8, 15, 16, 17], [7, 15, 16, 17, 18], [7, 11, 15, 16, 18], [7, 11, 16, 18, 19]]

    Args:
        pool_frames: the eligible older frames (absolute latent-frame indices, distinct, >= 0), any order; the
            permutation acts on this order, so pass a sorted pool for reproducible routes.
        num_branches: K >= 1, the number of routed branches (the unperturbed anchor takes no route).
        num_routed: n, frames per route, ``0 <= n <= P``.
        generator: CPU ``torch.Generator`` for a reproducible permutation (default: the global RNG).
    Returns:
        ``num_branches`` sorted lists of ``num_routed`` distinct frames of the pool.
    """
    pool = _validate(pool_frames, num_branches, num_routed, generator)
    size = len(pool)
    if num_routed == 0:
        return [[] for _ in range(num_branches)]
    perm = torch.randperm(size, generator=generator).tolist()
    shift = max(1, size // num_branches)
    return [sorted(pool[perm[(k * shift + i) % size]] for i in range(num_routed)) for k in range(num_branches)]


def uniform_routes(pool_frames: Sequence[int], num_branches: int, num_routed: int, *,
                   generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Independent uniform random subsets: branch ``k`` takes ``num_routed`` frames of the pool without replacement.

    Same arguments and validation as :func:`chr_routes`; each route is a fresh ``torch.randperm`` draw (so two
    branches may coincide), returned sorted.
    """
    pool = _validate(pool_frames, num_branches, num_routed, generator)
    routes = []
    for _ in range(num_branches):
        picks = torch.randperm(len(pool), generator=generator)[:num_routed].tolist()
        routes.append(sorted(pool[i] for i in picks))
    return routes
