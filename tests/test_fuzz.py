"""Fuzzing of both ops: random shapes, tables, strides, dtypes, scales and NaN/inf inputs, on every backend the
tables say runs CPU tensors here (and on those they refuse). No NaN/inf where the float64 reference is finite, no
crash, and no exception other than ValueError/TypeError (bad input, or a backend refusing it). Fresh cases every
run (conftest's seed, printed on failure); a few seconds on 2 cores.
"""
from __future__ import annotations

import random

import pytest
import torch

import kvpo_kernels
from kvpo_kernels import reference
from kvpo_kernels._backends import BACKENDS

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _strided(shape, dtype, rng: random.Random) -> torch.Tensor:
    """A random tensor of ``shape`` that is often a non-contiguous view (a slice of a wider, permuted buffer)."""
    if rng.random() < 0.5 or len(shape) < 2:
        return torch.randn(shape, dtype=torch.float64).to(dtype)
    wide = list(shape)
    wide[-1] += rng.randint(1, 3)
    buffer = torch.randn(list(reversed(wide)), dtype=torch.float64).to(dtype).permute(*reversed(range(len(shape))))
    return buffer[..., : shape[-1]]


def _poison(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Sometimes set a few elements to -inf, inf or NaN."""
    if x.numel() == 0 or rng.random() < 0.6:
        return x
    x = x.clone()
    for _ in range(rng.randint(1, 3)):
        index = tuple(rng.randrange(size) for size in x.shape)
        x[index] = rng.choice([float("-inf"), float("inf"), float("nan"), float("-inf")])
    return x


def _assert_finite_where_truth_is(name, actual, truth, context):
    finite = torch.isfinite(truth)
    bad = finite & ~torch.isfinite(actual.detach().double())
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite where the float64 reference is finite ({context})"


def _grads(out, leaves, dout):
    present = [leaf for leaf in leaves if leaf is not None]
    grads = torch.autograd.grad(out, present, dout.to(out.dtype), allow_unused=True)
    return [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, present)]


def _routed_attention_case(rng: random.Random):
    dtype = rng.choice(DTYPES)
    kv_heads, group = rng.randint(1, 2), rng.randint(1, 3)
    batch, q_len, head_dim = rng.randint(0, 3), rng.randint(0, 5), rng.randint(1, 40)
    num_blocks, block_size, max_blocks = rng.randint(1, 4), rng.randint(1, 7), rng.randint(0, 4)
    new_len = rng.choice([None, 0, 1, 3])
    index_dtype = rng.choice([torch.int32, torch.int64])
    counts = [rng.randint(0, max_blocks) for _ in range(batch)]
    # Entries past a row's count are junk (even out of range): never read.
    table = [[rng.randrange(num_blocks) if i < counts[b] else rng.randint(-5, 99) for i in range(max_blocks)]
             for b in range(batch)]
    inputs = {
        "q": _poison(_strided((batch, q_len, kv_heads * group, head_dim), dtype, rng), rng),
        "k_cache": _poison(_strided((num_blocks, block_size, kv_heads, head_dim), dtype, rng), rng),
        "v_cache": _poison(_strided((num_blocks, block_size, kv_heads, head_dim), dtype, rng), rng),
        "block_table": torch.tensor(table, dtype=index_dtype).reshape(batch, max_blocks),
        "block_counts": torch.tensor(counts, dtype=index_dtype) if rng.random() < 0.7 else None,
        "k_new": None,
        "v_new": None,
    }
    if inputs["block_counts"] is None:  # every entry is read: make them all valid
        inputs["block_table"] = torch.randint(0, num_blocks, (batch, max_blocks), dtype=index_dtype)
    if new_len is not None:
        inputs["k_new"] = _poison(_strided((batch, new_len, kv_heads, head_dim), dtype, rng), rng)
        inputs["v_new"] = _poison(_strided((batch, new_len, kv_heads, head_dim), dtype, rng), rng)
    scale = rng.choice([None, None, None, 0.3, 2.0, -0.5, 1e39, float("nan")])
    return inputs, scale


def _check_routed_attention(inputs, scale, backend):
    names = ("q", "k_cache", "v_cache", "k_new", "v_new")
    leaves = {n: inputs[n].detach().requires_grad_() if inputs[n] is not None else None for n in names}
    truth_leaves = {n: v.detach().double().requires_grad_() if v is not None else None for n, v in leaves.items()}
    tables = {"block_table": inputs["block_table"], "block_counts": inputs["block_counts"]}
    try:
        out = kvpo_kernels.routed_attention(**leaves, **tables, softmax_scale=scale, backend=backend)
    except (ValueError, TypeError):
        return False
    truth = reference.routed_attention(**truth_leaves, **tables, softmax_scale=scale)
    context = f"backend={backend}, dtype={inputs['q'].dtype}, q {tuple(inputs['q'].shape)}, scale={scale}"
    _assert_finite_where_truth_is("out", out, truth, context)
    if out.numel():
        dout = torch.randn(out.shape, dtype=torch.float64)
        grads = _grads(out, list(leaves.values()), dout)
        truth_grads = _grads(truth, list(truth_leaves.values()), dout)
        present = [n for n in names if leaves[n] is not None]
        for name, grad, truth_grad in zip(present, grads, truth_grads):
            _assert_finite_where_truth_is(f"d{name}", grad, truth_grad, context)
    return True


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name in ("triton", "torch")])
def test_fuzz_routed_attention(backend):
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    for _ in range(12):
        _check_routed_attention(*_routed_attention_case(rng), backend)


def test_fuzz_routed_attention_refusing_backends():
    """cuda and cpu have no kernel for this op: ValueError with the table's reason, never anything else."""
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    for backend in ("cuda", "cpu"):
        inputs, scale = _routed_attention_case(rng)
        with pytest.raises((ValueError, TypeError)):
            kvpo_kernels.routed_attention(**inputs, softmax_scale=scale, backend=backend)


def _velocity_energy_case(rng: random.Random):
    dtype = rng.choice(DTYPES)
    if rng.random() < 0.2:  # a few rows that span several blocks / programs
        shape = [rng.randint(1, 2), rng.randint(1, 2), rng.randint(4097, 9000)]
    else:
        shape = [rng.randint(0, 3), rng.randint(0, 4)] + [rng.randint(0, 5) for _ in range(rng.randint(0, 2))]
    pred = _poison(_strided(tuple(shape), dtype, rng), rng)
    target = _poison(_strided(tuple(shape), dtype, rng), rng)
    weight = rng.choice([None, "T", "BT"])
    if weight is not None:
        weight_shape = (shape[1],) if weight == "T" else (shape[0], shape[1])
        weight = _poison(torch.rand(weight_shape, dtype=torch.float64).to(rng.choice(DTYPES)) + 0.5, rng)
    return pred, target, weight, rng.choice(["mean", "sum"])


def _check_velocity_energy(pred, target, weight, reduction, backend):
    p, t = pred.detach().requires_grad_(), target.detach().requires_grad_()
    try:
        energy = kvpo_kernels.velocity_energy(p, t, weight, reduction=reduction, backend=backend)
    except (ValueError, TypeError):
        return False
    p64, t64 = pred.detach().double().requires_grad_(), target.detach().double().requires_grad_()
    truth = reference.velocity_energy(p64, t64, None if weight is None else weight.double(), reduction)
    context = f"backend={backend}, dtype={pred.dtype}, shape {tuple(pred.shape)}, {reduction}"
    _assert_finite_where_truth_is("E", energy, truth, context)
    if energy.numel():
        grad = torch.randn(energy.shape, dtype=torch.float64)
        for name, got, want in zip(("dpred", "dtarget"), _grads(energy, [p, t], grad), _grads(truth, [p64, t64], grad)):
            _assert_finite_where_truth_is(name, got, want, context)
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_velocity_energy(backend):
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    for _ in range(12):
        _check_velocity_energy(*_velocity_energy_case(rng), backend)
