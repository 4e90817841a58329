"""Route samplers: the documented CHR subsets for a fixed seed, invariants for random arguments, bad arguments."""
import random

import pytest
import torch

from kvpo_kernels.routing import chr_routes, uniform_routes

# chr_routes(range(6, 20), 8, 5, seed 0): the example of its docstring (LongLive: 14-frame pool, 8 branches, n = 5).
LONGLIVE_SEED0 = [[8, 9, 10, 12, 13], [8, 9, 12, 13, 17], [8, 12, 13, 15, 17], [8, 12, 15, 16, 17],
                  [7, 8, 15, 16, 17], [7, 15, 16, 17, 18], [7, 11, 15, 16, 18], [7, 11, 16, 18, 19]]


def test_chr_documented_subsets():
    routes = chr_routes(range(6, 20), 8, 5, generator=torch.Generator().manual_seed(0))
    assert routes == LONGLIVE_SEED0
    # The same master permutation with 4 branches: shift 3 instead of 1, so branch k starts 3k further on.
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(0)).tolist()
    four = chr_routes(range(6, 20), 4, 5, generator=torch.Generator().manual_seed(0))
    assert four == [sorted(6 + perm[(3 * k + i) % 14] for i in range(5)) for k in range(4)]
    assert four[0] == LONGLIVE_SEED0[0]


def _window(start, n, size):
    return {(start + i) % size for i in range(n)}


@pytest.mark.parametrize("trial", range(25))
def test_chr_invariants_random_arguments(trial):
    rng = random.Random(torch.initial_seed() + trial)
    size = rng.randint(1, 40)
    pool = rng.sample(range(0, 200), size)
    branches = rng.randint(1, 20)
    n = rng.randint(0, size)
    seed = rng.randint(0, 2**31)
    routes = chr_routes(pool, branches, n, generator=torch.Generator().manual_seed(seed))
    assert len(routes) == branches
    shift = max(1, size // branches)
    windows = [_window(k * shift, n, size) for k in range(branches)]
    for route in routes:
        assert route == sorted(route) and len(route) == n and len(set(route)) == n and set(route) <= set(pool)
    # Routes are windows of one permutation: every pairwise overlap and the coverage are those of the index
    # windows, whatever the permutation.
    for j in range(branches):
        for k in range(branches):
            assert len(set(routes[j]) & set(routes[k])) == len(windows[j] & windows[k]), (j, k)
    assert len(set().union(*map(set, routes))) == len(set().union(*windows))
    # Reproducible for a seed; another seed permutes differently (when there is room to).
    assert routes == chr_routes(pool, branches, n, generator=torch.Generator().manual_seed(seed))


def test_chr_covers_pool_when_branches_tile_it():
    routes = chr_routes(list(range(12)), 4, 3, generator=torch.Generator().manual_seed(1))
    assert sorted(f for r in routes for f in r) == list(range(12))  # shift 3 = n: a partition of the pool


def test_uniform_routes_invariants():
    pool = list(range(3, 17))
    routes = uniform_routes(pool, 16, 5, generator=torch.Generator().manual_seed(3))
    assert len(routes) == 16
    for route in routes:
        assert route == sorted(route) and len(set(route)) == 5 and set(route) <= set(pool)
    assert len({tuple(r) for r in routes}) > 1
    assert routes == uniform_routes(pool, 16, 5, generator=torch.Generator().manual_seed(3))


def test_samplers_accept_tensor_pool_and_zero_routed():
    assert chr_routes(torch.arange(4, 9), 3, 0) == [[], [], []]
    assert uniform_routes(torch.arange(4, 9), 2, 5) == [[4, 5, 6, 7, 8]] * 2


@pytest.mark.parametrize("sampler", [chr_routes, uniform_routes])
@pytest.mark.parametrize("args, error, match", [
    ((range(5), 2, 6), ValueError, "num_routed"),
    ((range(5), 0, 2), ValueError, "num_branches"),
    ((range(5), 2, -1), ValueError, "num_routed"),
    (([1, 1, 2], 2, 1), ValueError, "repeat"),
    (([1, -2], 2, 1), ValueError, "non-negative"),
    (([1.5, 2], 2, 1), TypeError, "pool_frames"),
    ((range(5), 2.0, 1), TypeError, "num_branches"),
    ((range(5), 2, True), TypeError, "num_routed"),
    ((5, 2, 1), TypeError, "pool_frames"),
    ((torch.rand(4), 2, 1), TypeError, "pool_frames"),
])
def test_samplers_reject_bad_arguments(sampler, args, error, match):
    with pytest.raises(error, match=match):
        sampler(*args)


def test_samplers_reject_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        chr_routes(range(5), 2, 1, generator=0)


def _documented_coverage(size, branches, n):
    """chr_routes' docstring: the group's coverage of a pool of `size` frames."""
    if n == 0:
        return 0
    if branches > size:
        return size
    shift = max(1, size // branches)
    return (branches - 1) * min(n, shift) + min(n, size - (branches - 1) * shift)


@pytest.mark.parametrize("trial", range(40))
def test_chr_coverage_matches_the_documented_formula(trial):
    rng = random.Random(torch.initial_seed() + 100 + trial)
    size = rng.randint(1, 30)
    branches, n = rng.randint(1, 40), rng.randint(0, size)
    routes = chr_routes(range(size), branches, n, generator=torch.Generator().manual_seed(trial))
    assert len(set().union(*map(set, routes))) == _documented_coverage(size, branches, n)


def test_chr_coverage_when_the_shift_exceeds_the_route():
    """P = 14, K = 2, n = 5: shift 7 leaves gaps: 10 frames covered (the old formula claimed 12)."""
    routes = chr_routes(range(6, 20), 2, 5, generator=torch.Generator().manual_seed(0))
    assert len(set(routes[0]) | set(routes[1])) == 10 == _documented_coverage(14, 2, 5)


@pytest.mark.parametrize("sampler", [chr_routes, uniform_routes])
def test_every_sampler_draws_every_pool_frame(sampler):
    """Over a few groups each sampler routes every frame of the pool, the first and the LAST included (a sampler
    that never draws some frame, e.g. an off-by-one range, fails)."""
    pool = list(range(6, 20))
    drawn = set()
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        for route in sampler(pool, 8, 5, generator=generator):
            drawn.update(route)
    assert drawn == set(pool)
    # one branch, one frame: over many draws every frame, and each about equally often (uniform over the pool)
    counts = {frame: 0 for frame in pool}
    for _ in range(1400):
        counts[sampler(pool, 1, 1, generator=generator)[0][0]] += 1
    assert min(counts.values()) > 50, counts
