"""Pure-PyTorch implementations of every op: the executable spec.

Each function computes exactly what the fused kernels must compute, in the obvious (slow, copying) way, in the
dtype it is given, so that the tests can run it twice: in float64 (the truth) and in the kernel's low-precision
dtype (what a user would get from plain PyTorch, the error budget of the kernels). Autograd through these
functions gives the reference gradients. No validation happens here: the ops layer validates before dispatch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._device import accumulation_dtype


def velocity_energy(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                    reduction: str = "mean") -> torch.Tensor:
    """``E[b, t] = weight[b, t] * reduce_j (pred[b, t, j] - target[b, t, j])^2``.

    pred, target: ``[B, T, *]`` (same shape, trailing dims flattened into j); weight: None, ``[T]`` or ``[B, T]``;
    reduce: mean or sum over j. Returns ``[B, T]`` in float32 (float64 for float64 inputs).
    """
    acc = accumulation_dtype(pred.dtype)
    batch, steps = pred.shape[:2]
    diff = pred.to(acc) - target.to(acc)
    # The row length is spelled out: reshape cannot infer a -1 from zero elements (B * T = 0).
    squared = diff.square().reshape(batch, steps, math.prod(pred.shape[2:]))
    energy = squared.mean(-1) if reduction == "mean" else squared.sum(-1)
    if weight is not None:
        energy = energy * weight.to(acc).expand(batch, steps)
    return energy


def routed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     block_counts: Optional[torch.Tensor] = None, k_new: Optional[torch.Tensor] = None,
                     v_new: Optional[torch.Tensor] = None, *, softmax_scale: Optional[float] = None,
                     return_lse: bool = False):
    """Gather-and-concatenate attention over routed KV blocks (what the public KVPO code does, with copies).

    q: ``[B, Lq, Hq, D]``; k_cache, v_cache: ``[N, S, Hkv, D]``; block_table: int ``[B, M]``;
    block_counts: int ``[B]`` or None (all M); k_new, v_new: ``[B, Ln, Hkv, D]`` or None.
    Sequence b attends, unmasked, to ``cat(k_cache[block_table[b, i]] for i < block_counts[b])`` followed by
    ``k_new[b]``. Query head h reads kv head ``h // (Hq // Hkv)``. Returns out ``[B, Lq, Hq, D]`` and, with
    return_lse, ``lse [B, Hq, Lq]`` (float32, natural log; -inf and out = 0 where a sequence has no keys).
    Scores and the softmax are computed in float32 for low-precision inputs (as PyTorch's math SDPA does).
    """
    batch, q_len, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    acc = accumulation_dtype(q.dtype)
    max_blocks = block_table.shape[1]
    if batch == 0:  # nothing to stack
        out, lse = q.new_zeros(q.shape), q.new_zeros((0, q_heads, q_len), dtype=acc)
        return (out, lse) if return_lse else out
    outs, lses = [], []
    for b in range(batch):
        count = max_blocks if block_counts is None else int(block_counts[b])
        ids = block_table[b, :count].long()
        keys = [k_cache[ids].reshape(count * block_size, kv_heads, head_dim)]
        values = [v_cache[ids].reshape(count * block_size, kv_heads, head_dim)]
        if k_new is not None:
            keys.append(k_new[b])
            values.append(v_new[b])
        k = torch.cat(keys).repeat_interleave(group, dim=1)  # [Lk, Hq, D]
        v = torch.cat(values).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b], k).to(acc) * scale  # [Hq, Lq, Lk]
        lse = torch.logsumexp(scores, dim=-1)  # -inf when Lk == 0
        probs = torch.exp(scores - lse.unsqueeze(-1)) if k.shape[0] > 0 else scores
        out = torch.einsum("hqk,khd->qhd", probs.to(q.dtype), v)  # zeros when Lk == 0
        outs.append(out)
        lses.append(lse.float() if acc == torch.float32 else lse)
    out = torch.stack(outs)
    if return_lse:
        return out, torch.stack(lses)
    return out
