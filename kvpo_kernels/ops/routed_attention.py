"""``routed_attention``: attention of each sequence over its routed blocks of a shared paged KV pool, fwd + bwd.

Layers: validation (here, before anything runs) -> backend choice (``select_backend``) -> the ``torch.library``
custom ops ``kvpo::routed_attention_fwd`` / ``kvpo::routed_attention_bwd`` (fake implementations, autograd
registration; opaque to ``torch.compile``) -> the Triton launchers in ``kvpo_kernels/triton/routed_attention.py``
or the pure-PyTorch backend (``reference.py`` forward, gather-based backward below).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._device import assume_constant_result
from .._backends import triton_interpreting, check_backend_name, machine_unavailable, register_op, select_backend, tensor_device_unavailable

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_HEAD_DIM = 256
_LOG2E = math.log2(math.e)
_FP32_MAX = torch.finfo(torch.float32).max
_NO_NATIVE = {
    "cuda": "no CUDA C++ kernel for this op yet; use triton",
    "cpu": "no C++ CPU kernel for this op yet; use torch (or triton under TRITON_INTERPRET=1)",
}


def routed_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                     block_counts: Optional[Tensor] = None, k_new: Optional[Tensor] = None,
                     v_new: Optional[Tensor] = None, *, softmax_scale: Optional[float] = None,
                     return_lse: bool = False, backend: str = "auto", check_block_ids: bool = True):
    """Attention of B sequences over routed blocks of a shared paged KV pool, plus an optional per-sequence chunk.

    Args:
        q: ``[B, Lq, Hq, D]`` queries of B sequences (e.g. the branches of a group). Any strides.
        k_cache, v_cache: ``[N, S, Hkv, D]`` the shared pool: N blocks of S tokens each (S any positive int,
            e.g. 1560 for one latent video frame).
        block_table: int32 or int64 ``[B, M]``: the pool block ids sequence b reads, in order.
        block_counts: int32 or int64 ``[B]``, the number of valid entries of each table row, in [0, M]
            (default: M for every row). Entries past a row's count are never read and may hold anything.
        k_new, v_new: ``[B, Ln, Hkv, D]`` or both None: each sequence's own keys/values (the current chunk).
        softmax_scale: scale of ``q . k`` before the softmax; default ``1 / sqrt(D)``.
        return_lse: also return ``lse [B, Hq, Lq]`` (fp32, natural log of the softmax denominator, scale
            included). A gradient flowing into lse is supported.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (``"cuda"`` and ``"cpu"`` are not implemented for this
            op). ``auto`` runs CUDA tensors on Triton and CPU tensors on the torch reference; ``KVPO_BACKEND``
            overrides it. ``"triton"`` accepts CPU tensors only under ``TRITON_INTERPRET=1`` (slow; for tests).
        check_block_ids: check ``0 <= block_counts <= M`` and ``0 <= block_table[b, i] < N`` for ``i <
            block_counts[b]`` before running. This costs one device-to-host synchronisation per forward call (a
            few microseconds plus a stall of the host's launch queue on CUDA). Pass False only when the tables are
            known valid: an out-of-range id then reads outside the pool.

    Returns:
        out ``[B, Lq, Hq, D]`` in q's dtype (contiguous), or ``(out, lse)`` with ``return_lse``.

    Which keys each query sees: sequence b's key list is, with no mask, the S tokens of pool block
    ``block_table[b, 0]``, then those of ``block_table[b, 1]``, ... up to ``block_table[b, block_counts[b] - 1]``,
    then its Ln tokens ``k_new[b]``. Every query of b attends to all of them (block-causality across chunks is
    whatever the table holds). Query head h reads kv head ``h // (Hq // Hkv)`` (GQA; Hq must be a multiple of
    Hkv). A block may appear in several rows and several times in one row; each appearance is a separate run of
    S keys. A sequence with no keys (count 0 and no chunk) gets out = 0, lse = -inf and zero gradients.

    Gradients: q, k_new and v_new; k_cache and v_cache only when they require grad (otherwise no work is done for
    them). A pool block read by several sequences, or several times by one, receives the sum of all those
    gradients, accumulated in fp32 in a fixed order (by sequence, then table position): repeated calls give
    bitwise identical gradients on the Triton backend (no atomics). Blocks nobody reads get zero gradient.
    All scores, softmax statistics and accumulators are fp32. Dtypes: fp16, bf16, fp32, all tensors one dtype;
    D <= 256.
    """
    _validate(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, return_lse,
                      check_block_ids)
    batch, head_dim = q.shape[0], q.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    if block_counts is None:
        block_counts = torch.full((batch,), block_table.shape[1], dtype=torch.int32, device=block_table.device)
    chosen = _choose_backend(check_backend_name(backend), q.device.type, q.dtype)
    out, lse = torch.ops.kvpo.routed_attention_fwd(q, k_cache, v_cache, block_table, block_counts, k_new, v_new,
                                                   scale, chosen, check_block_ids)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _require_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"routed_attention: {name} must be a torch.Tensor, got {type(value).__name__}")


def _validate(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, return_lse,
              check_block_ids) -> None:
    """Every check that needs no data from the device (the table values are checked inside the op)."""
    for name, value in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table)):
        _require_tensor(name, value)
    if (k_new is None) != (v_new is None):
        raise ValueError("routed_attention: k_new and v_new must be given together (both or neither)")
    if block_counts is not None:
        _require_tensor("block_counts", block_counts)
    if k_new is not None:
        _require_tensor("k_new", k_new)
        _require_tensor("v_new", v_new)
    if q.dim() != 4:
        raise ValueError(f"routed_attention: q must be [B, Lq, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"routed_attention: k_cache must be [N, S, Hkv, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"routed_attention: v_cache shape {tuple(v_cache.shape)} != k_cache shape "
                         f"{tuple(k_cache.shape)}")
    batch, _, q_heads, head_dim = q.shape
    _, block_size, kv_heads, kv_dim = k_cache.shape
    if q.dtype not in _DTYPES:
        raise TypeError(f"routed_attention: q must be float16, bfloat16 or float32, got {q.dtype}")
    tensors = [("k_cache", k_cache), ("v_cache", v_cache)]
    tensors += [("k_new", k_new), ("v_new", v_new)] if k_new is not None else []
    for name, tensor in tensors:
        if tensor.dtype != q.dtype:
            raise TypeError(f"routed_attention: {name} dtype {tensor.dtype} != q dtype {q.dtype} (one dtype for all)")
    if kv_dim != head_dim:
        raise ValueError(f"routed_attention: k_cache head dim {kv_dim} != q head dim {head_dim}")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"routed_attention: head dim D must be in [1, {_MAX_HEAD_DIM}], got {head_dim}")
    if block_size < 1:
        raise ValueError(f"routed_attention: k_cache block size S (dim 1) must be >= 1, got {block_size}")
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(f"routed_attention: q heads ({q_heads}) must be a positive multiple of k_cache heads "
                         f"({kv_heads})")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"routed_attention: block_table must be [B={batch}, M], got shape {tuple(block_table.shape)}")
    if block_table.dtype not in _INDEX_DTYPES:
        raise TypeError(f"routed_attention: block_table must be int32 or int64, got {block_table.dtype}")
    if block_counts is not None:
        if block_counts.shape != (batch,):
            raise ValueError(f"routed_attention: block_counts must be [B={batch}], got shape "
                             f"{tuple(block_counts.shape)}")
        if block_counts.dtype not in _INDEX_DTYPES:
            raise TypeError(f"routed_attention: block_counts must be int32 or int64, got {block_counts.dtype}")
    if k_new is not None:
        if k_new.dim() != 4 or k_new.shape[0] != batch or k_new.shape[2] != kv_heads or k_new.shape[3] != head_dim:
            raise ValueError(f"routed_attention: k_new must be [B={batch}, Ln, Hkv={kv_heads}, D={head_dim}], got "
                             f"shape {tuple(k_new.shape)}")
        if v_new.shape != k_new.shape:
            raise ValueError(f"routed_attention: v_new shape {tuple(v_new.shape)} != k_new shape {tuple(k_new.shape)}")
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table)]
    named += [("block_counts", block_counts)] if block_counts is not None else []
    named += [("k_new", k_new), ("v_new", v_new)] if k_new is not None else []
    for name, tensor in named:
        if tensor.device != q.device:
            raise ValueError(f"routed_attention: {name} is on {tensor.device}, q on {q.device} (one device for all)")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))):
        raise TypeError(f"routed_attention: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if softmax_scale is not None and not abs(softmax_scale) * _LOG2E <= _FP32_MAX:
        # The kernels scale scores by softmax_scale * log2(e) in fp32: past ~2.4e38 that is inf (and 1e39, which
        # math.isfinite accepts, is no fp32 number at all).
        raise ValueError(f"routed_attention: softmax_scale must be finite in float32, with |softmax_scale| * log2(e) "
                         f"<= {_FP32_MAX:.4g}, got {softmax_scale}")
    for name, flag in (("return_lse", return_lse), ("check_block_ids", check_block_ids)):
        if not isinstance(flag, bool):
            raise TypeError(f"routed_attention: {name} must be a bool, got {type(flag).__name__}")


def _check_table_values(block_table: Tensor, block_counts: Tensor, num_blocks: int) -> None:
    """The data-dependent checks: one device-to-host copy of two flags."""
    max_blocks = block_table.shape[1]
    counts = block_counts.long()
    valid = torch.arange(max_blocks, device=block_table.device)[None, :] < counts[:, None]
    bad_ids = valid & ((block_table < 0) | (block_table >= num_blocks))
    flags = torch.stack([((counts < 0) | (counts > max_blocks)).any(), bad_ids.any()]).tolist()
    if flags[0]:
        raise ValueError(f"routed_attention: block_counts must lie in [0, M={max_blocks}], got "
                         f"{block_counts.tolist()}")
    if flags[1]:
        b, i = (int(x) for x in bad_ids.nonzero()[0])
        raise ValueError(f"routed_attention: block_table[{b}, {i}] = {int(block_table[b, i])} is outside the pool "
                         f"[0, N={num_blocks})")


# ----------------------------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------------------------
def _capability(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run this op on this machine at all (for ``available_backends``)."""
    return _NO_NATIVE.get(backend) or machine_unavailable(backend)


@assume_constant_result
def _choose_backend(requested: str, device_type: str, dtype: torch.dtype = torch.float32) -> str:
    """Backend for inputs on ``device_type``. Evaluated once at trace time under torch.compile (plain arguments)."""

    def why_not(backend: str) -> Optional[str]:
        if backend in _NO_NATIVE:
            return _NO_NATIVE[backend]
        if backend == "triton":
            if dtype == torch.bfloat16 and triton_interpreting():
                return ("bfloat16 does not run under TRITON_INTERPRET=1 (the interpreter's bf16 tl.dot multiplies raw "
                        "bit patterns, an upstream Triton limitation); use float16/float32 there, or a CUDA device")
            return tensor_device_unavailable("triton", torch.device(device_type))
        return None

    return select_backend("routed_attention", requested, why_not, device_type)


register_op("routed_attention", _capability)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("kvpo::routed_attention_fwd", mutates_args=())
def _routed_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, block_counts: Tensor,
                          k_new: Optional[Tensor], v_new: Optional[Tensor], softmax_scale: float, backend: str,
                          check_block_ids: bool) -> Tuple[Tensor, Tensor]:
    """(out [B, Lq, Hq, D] contiguous, lse [B, Hq, Lq] fp32). Table values are checked here, inside the op, so
    that the host sync is invisible to torch.compile."""
    if check_block_ids:
        _check_table_values(block_table, block_counts, k_cache.shape[0])
    if backend == "triton":
        from ..triton.routed_attention import routed_attention_forward
        return routed_attention_forward(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale)
    if q.shape[0] == 0:  # the reference stacks per-sequence results
        return q.new_empty(q.shape), q.new_empty((0, q.shape[2], q.shape[1]), dtype=torch.float32)
    out, lse = reference.routed_attention(q, k_cache, v_cache, block_table, block_counts, k_new, v_new,
                                          softmax_scale=softmax_scale, return_lse=True)
    return out.contiguous(), lse.float().contiguous()


@_routed_attention_fwd.register_fake
def _routed_attention_fwd_fake(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, backend,
                               check_block_ids):
    batch, q_len, q_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, q_heads, q_len), dtype=torch.float32)


@torch.library.custom_op("kvpo::routed_attention_bwd", mutates_args=())
def _routed_attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k_cache: Tensor, v_cache: Tensor,
                          block_table: Tensor, block_counts: Tensor, k_new: Optional[Tensor],
                          v_new: Optional[Tensor], out: Tensor, lse: Tensor, softmax_scale: float, backend: str,
                          need_dq: bool, need_dcache: bool,
                          need_dnew: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk_cache, dv_cache, dk_new, dv_new); a gradient not asked for comes back as an empty [0] tensor."""
    if backend == "triton":
        from ..triton.routed_attention import routed_attention_backward
        grads = routed_attention_backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new,
                                          out, lse, softmax_scale, need_dq, need_dcache, need_dnew)
    else:
        grads = _torch_backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, lse,
                                out, softmax_scale, need_dq, need_dcache, need_dnew)
    return tuple(q.new_empty(0) if grad is None else grad for grad in grads)


@_routed_attention_bwd.register_fake
def _routed_attention_bwd_fake(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse,
                               softmax_scale, backend, need_dq, need_dcache, need_dnew):
    def like(tensor, needed):
        return q.new_empty(tensor.shape) if needed and tensor is not None else q.new_empty(0)

    return (like(q, need_dq), like(k_cache, need_dcache), like(v_cache, need_dcache), like(k_new, need_dnew),
            like(v_new, need_dnew))


def _setup_context(ctx, inputs, output):
    q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, backend, _check = inputs
    out, lse = output
    ctx.save_for_backward(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.backend = backend
    # An unused lse (the common case) then arrives as None, and the kernels skip the dlse term.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dq, need_dcache, need_dnew = need[0], need[1] or need[2], k_new is not None and (need[5] or need[6])
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dq, dk_cache, dv_cache, dk_new, dv_new = torch.ops.kvpo.routed_attention_bwd(
        dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse, ctx.softmax_scale,
        ctx.backend, need_dq, need_dcache, need_dnew)
    return (dq if need[0] else None, dk_cache if need[1] else None, dv_cache if need[2] else None, None, None,
            dk_new if need[5] else None, dv_new if need[6] else None, None, None, None)


torch.library.register_autograd("kvpo::routed_attention_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# The torch backend's backward (gather-based, the same math as the Triton kernels)
# ----------------------------------------------------------------------------------------------------------------
def _torch_backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, lse, out,
                    softmax_scale, need_dq, need_dcache, need_dnew):
    """Per sequence: gather its keys, recompute P = exp(s - lse), then dV = P^T dO, dS = P (dO V^T - delta),
    dQ = scale dS K, dK = scale dS^T Q, with delta = rowsum(dO * O) - dlse. Pool gradients are summed with
    ``index_add_`` in fp32 (deterministic on CPU; CUDA's index_add_ uses atomics, use the triton backend there)."""
    batch, q_len, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    acc = torch.float32
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, Hq, Lq]
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk_cache = torch.zeros(k_cache.shape, dtype=acc, device=q.device)
    dv_cache = torch.zeros(v_cache.shape, dtype=acc, device=q.device)
    dk_new = torch.zeros(k_new.shape, dtype=acc, device=q.device) if k_new is not None else None
    dv_new = torch.zeros(v_new.shape, dtype=acc, device=q.device) if k_new is not None else None
    counts = block_counts.tolist()
    for b in range(batch):
        ids = block_table[b, : counts[b]].long()
        keys, values = [k_cache[ids].reshape(-1, kv_heads, head_dim)], [v_cache[ids].reshape(-1, kv_heads, head_dim)]
        if k_new is not None:
            keys.append(k_new[b])
            values.append(v_new[b])
        k = torch.cat(keys).to(acc).repeat_interleave(group, dim=1)  # [Lk, Hq, D]
        v = torch.cat(values).to(acc).repeat_interleave(group, dim=1)
        if k.shape[0] == 0:
            continue
        qb, dob = q[b].to(acc), dout[b].to(acc)
        p = torch.exp(torch.einsum("qhd,khd->hqk", qb, k) * softmax_scale - lse[b].to(acc)[..., None])
        ds = p * (torch.einsum("qhd,khd->hqk", dob, v) - delta[b][..., None])
        dq[b] = torch.einsum("hqk,khd->qhd", ds, k) * softmax_scale
        dk = (torch.einsum("hqk,qhd->khd", ds, qb) * softmax_scale).unflatten(1, (kv_heads, group)).sum(2)
        dv = torch.einsum("hqk,qhd->khd", p, dob).unflatten(1, (kv_heads, group)).sum(2)
        pooled = counts[b] * block_size
        dk_cache.index_add_(0, ids, dk[:pooled].reshape(-1, block_size, kv_heads, head_dim))
        dv_cache.index_add_(0, ids, dv[:pooled].reshape(-1, block_size, kv_heads, head_dim))
        if k_new is not None:
            dk_new[b], dv_new[b] = dk[pooled:], dv[pooled:]

    def cast(grad, needed):
        return grad.to(q.dtype) if needed and grad is not None else None

    return (cast(dq, need_dq), cast(dk_cache, need_dcache), cast(dv_cache, need_dcache), cast(dk_new, need_dnew),
            cast(dv_new, need_dnew))
