"""``routed_attention``: attention of each sequence over its routed blocks of a shared paged KV pool, fwd + bwd.

Layers (the template every op follows): validation (here, before anything runs) -> the backend table ``_TABLE``
read by ``select_backend`` -> the ``torch.library`` custom ops ``kvpo::routed_attention_fwd`` /
``kvpo::routed_attention_bwd`` (fake implementations, autograd registration; opaque to ``torch.compile``) when
torch.compile traces the call, and an equivalent ``autograd.Function`` for eager calls: with this op's signature
the custom op's dispatch measured ~2x the Function's on a shared CPU core (15-36 us against 8-20 us per forward,
135-370 us against 58-180 us per forward + backward, two runs), as velocity_energy found -> the launchers named
in the table: the Triton ones in ``kvpo_kernels/triton/routed_attention.py`` (or, with
``KVPO_TRITON_FORWARD=tma``, the tensor-descriptor forward of ``routed_attention_tma.py``), and the pure-PyTorch
backend (``reference.py`` forward, the gather-based backward below).
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._backends import Backend, check_backend_name, launcher, register_op, select_backend, triton_interpreting
from .._device import LOG2E, accumulation_dtype, assume_constant_result, launch_device

_OP = "routed_attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)  # float64: the torch backend only (exact checks of user models)
_INDEX_DTYPES = (torch.int32, torch.int64)
_FP32_MAX = torch.finfo(torch.float32).max
_TRITON_FORWARDS = ("blocktable", "tma")
_TMA_MODULE = "kvpo_kernels.triton.routed_attention_tma"


def triton_forward_variant() -> str:
    """``KVPO_TRITON_FORWARD``: which Triton forward the triton backend runs. ``blocktable`` (default): the block
    table walk of triton/routed_attention.py; ``tma``: the sm_90 tensor-descriptor forward of
    triton/routed_attention_tma.py (until a GPU benchmark decides which ``auto`` prefers)."""
    variant = os.environ.get("KVPO_TRITON_FORWARD", "blocktable").strip() or "blocktable"
    if variant not in _TRITON_FORWARDS:
        raise ValueError(f"{_OP}: KVPO_TRITON_FORWARD must be one of {_TRITON_FORWARDS}, got {variant!r}")
    return variant


def _triton_forward_requirement(device: Optional[torch.device]) -> Optional[str]:
    """Why the selected Triton forward cannot run on ``device`` (None: this machine's current device)."""
    if triton_forward_variant() == "blocktable":
        return None
    try:
        importlib.import_module(_TMA_MODULE)
    except ImportError as err:
        return f"KVPO_TRITON_FORWARD=tma, but {_TMA_MODULE} cannot be imported ({err})"
    if triton_interpreting():
        return None
    on_sm90 = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if on_sm90:
        on_sm90 = torch.cuda.get_device_capability(device) == (9, 0)
    return None if on_sm90 else "tma forward needs an sm_90 CUDA device, or TRITON_INTERPRET=1"


_TABLE = {
    "cuda": Backend(missing="no CUDA C++ kernel for this op yet; use triton"),
    "triton": Backend(dtypes=_KERNEL_DTYPES, devices=("cuda", "cpu"), head_dims=(1, 256),
                      forward=f"{__name__}:triton_forward",
                      backward="kvpo_kernels.triton.routed_attention:routed_attention_backward",
                      interpreter_dtypes=(torch.float16, torch.float32),
                      interpreter_note="the interpreter's bf16 tl.dot multiplies raw bit patterns (an upstream Triton "
                                       "limitation); use float16/float32 there, or a CUDA device",
                      requirement=_triton_forward_requirement),
    "cpu": Backend(missing="no C++ CPU kernel for this op yet; use torch (or triton under TRITON_INTERPRET=1)"),
    "torch": Backend(dtypes=_DTYPES, forward=f"{__name__}:torch_forward", backward=f"{__name__}:torch_backward"),
}
register_op(_OP, _TABLE)


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
        softmax_scale: scale of ``q . k`` before the softmax; default ``1 / sqrt(D)``. Must be finite in fp32.
        return_lse: also return ``lse [B, Hq, Lq]`` (fp32, fp64 for fp64 inputs; natural log of the softmax
            denominator, scale included). A gradient flowing into lse is supported.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (``"cuda"`` and ``"cpu"`` are not implemented for this
            op). ``auto`` runs CUDA tensors on Triton and CPU tensors on the torch reference; ``KVPO_BACKEND``
            overrides it. ``"triton"`` accepts CPU tensors only under ``TRITON_INTERPRET=1`` (slow; for tests; no
            bf16 there). ``KVPO_TRITON_FORWARD=tma`` selects the sm_90 tensor-descriptor forward.
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
    All scores, softmax statistics and accumulators are fp32 (fp64 for fp64). Dtypes: fp16, bf16, fp32 (and fp64
    on the torch backend), all tensors one dtype; D <= 256 on Triton.
    """
    _validate(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, return_lse,
              check_block_ids)
    batch, head_dim = q.shape[0], q.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    if block_counts is None:
        block_counts = torch.full((batch,), block_table.shape[1], dtype=torch.int32, device=block_table.device)
    chosen = _choose_backend(check_backend_name(_OP, backend), q.device, q.dtype, head_dim)
    args = (q, k_cache, v_cache, block_table, block_counts, k_new, v_new, scale, chosen, check_block_ids)
    if torch.compiler.is_compiling():
        out, lse = torch.ops.kvpo.routed_attention_fwd(*args)
    else:
        out, lse = _RoutedAttentionFunction.apply(*args)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _require_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(value).__name__}")


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
        raise TypeError(f"routed_attention: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    tensors = [("k_cache", k_cache), ("v_cache", v_cache)]
    tensors += [("k_new", k_new), ("v_new", v_new)] if k_new is not None else []
    for name, tensor in tensors:
        if tensor.dtype != q.dtype:
            raise TypeError(f"routed_attention: {name} dtype {tensor.dtype} != q dtype {q.dtype} (one dtype for all)")
    if kv_dim != head_dim:
        raise ValueError(f"routed_attention: k_cache head dim {kv_dim} != q head dim {head_dim}")
    if head_dim < 1:
        raise ValueError(f"routed_attention: head dim D must be >= 1, got {head_dim}")
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
    if softmax_scale is not None and not abs(softmax_scale) * LOG2E <= _FP32_MAX:
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
# Backend choice and launchers
# ----------------------------------------------------------------------------------------------------------------
@assume_constant_result
def _choose_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None) -> str:
    """Backend for these inputs. Evaluated once at trace time under torch.compile (plain arguments)."""
    return select_backend(_OP, requested, device, dtype, head_dim)


def triton_forward(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale):
    """The triton backend's forward: the block-table kernel, or the TMA one with ``KVPO_TRITON_FORWARD=tma``."""
    if triton_forward_variant() == "tma":
        forward = importlib.import_module(_TMA_MODULE).routed_attention_forward_tma
    else:
        forward = importlib.import_module("kvpo_kernels.triton.routed_attention").routed_attention_forward
    return forward(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale)


def torch_forward(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale):
    """The torch backend's forward: the reference. (out contiguous, lse in the accumulation dtype)."""
    out, lse = reference.routed_attention(q, k_cache, v_cache, block_table, block_counts, k_new, v_new,
                                          softmax_scale=softmax_scale, return_lse=True)
    return out.contiguous(), lse.to(accumulation_dtype(q.dtype)).contiguous()


def _forward(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, backend, check_block_ids):
    """(out, lse) of the chosen backend. Table values are checked here, inside the custom op under torch.compile,
    so that the host sync is invisible to it."""
    if check_block_ids:
        _check_table_values(block_table, block_counts, k_cache.shape[0])
    with launch_device(q.device):
        return launcher(_OP, backend, "forward")(q, k_cache, v_cache, block_table, block_counts, k_new, v_new,
                                                 softmax_scale)


def _backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse, softmax_scale,
              backend, need_dq, need_dcache, need_dnew):
    """(dq, dk_cache, dv_cache, dk_new, dv_new), None where not needed (no work is done for those)."""
    with launch_device(q.device):
        return launcher(_OP, backend, "backward")(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new,
                                                  v_new, out, lse, softmax_scale, need_dq, need_dcache, need_dnew)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (traced code) and the autograd.Function (eager calls): one forward, one backward
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("kvpo::routed_attention_fwd", mutates_args=())
def _routed_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, block_counts: Tensor,
                          k_new: Optional[Tensor], v_new: Optional[Tensor], softmax_scale: float, backend: str,
                          check_block_ids: bool) -> Tuple[Tensor, Tensor]:
    """(out [B, Lq, Hq, D] contiguous, lse [B, Hq, Lq] fp32, fp64 for fp64 inputs)."""
    return _forward(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, backend,
                    check_block_ids)


@_routed_attention_fwd.register_fake
def _routed_attention_fwd_fake(q, k_cache, v_cache, block_table, block_counts, k_new, v_new, softmax_scale, backend,
                               check_block_ids):
    batch, q_len, q_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, q_heads, q_len), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("kvpo::routed_attention_bwd", mutates_args=())
def _routed_attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k_cache: Tensor, v_cache: Tensor,
                          block_table: Tensor, block_counts: Tensor, k_new: Optional[Tensor],
                          v_new: Optional[Tensor], out: Tensor, lse: Tensor, softmax_scale: float, backend: str,
                          need_dq: bool, need_dcache: bool,
                          need_dnew: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk_cache, dv_cache, dk_new, dv_new); a gradient not asked for comes back as an empty [0] tensor."""
    grads = _backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse,
                      softmax_scale, backend, need_dq, need_dcache, need_dnew)
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


def _grads(ctx, dout, dlse, backward):
    """The 10 input gradients, from ``backward`` (the custom op or the launchers)."""
    q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dq, need_dcache, need_dnew = need[0], need[1] or need[2], k_new is not None and (need[5] or need[6])
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dq, dk_cache, dv_cache, dk_new, dv_new = backward(
        dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse, ctx.softmax_scale,
        ctx.backend, need_dq, need_dcache, need_dnew)
    return (dq if need[0] else None, dk_cache if need[1] else None, dv_cache if need[2] else None, None, None,
            dk_new if need[5] else None, dv_new if need[6] else None, None, None, None)


torch.library.register_autograd("kvpo::routed_attention_fwd",
                                lambda ctx, dout, dlse: _grads(ctx, dout, dlse, torch.ops.kvpo.routed_attention_bwd),
                                setup_context=_setup_context)


class _RoutedAttentionFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without their dispatch cost (see the module doc)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, dlse, _backward)


# ----------------------------------------------------------------------------------------------------------------
# The torch backend's backward (gather-based, the same math as the Triton kernels)
# ----------------------------------------------------------------------------------------------------------------
def torch_backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse,
                   softmax_scale, need_dq, need_dcache, need_dnew):
    """Per sequence: gather its keys, recompute P = exp(s - lse), then dV = P^T dO, dS = P (dO V^T - delta),
    dQ = scale dS K, dK = scale dS^T Q, with delta = rowsum(dO * O) - dlse; only the gradients asked for are
    computed. Pool gradients are summed with ``index_add_`` in fp32 (fp64 for fp64; deterministic on CPU; CUDA's
    index_add_ uses atomics, use the triton backend there)."""
    batch, q_len, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    acc = accumulation_dtype(q.dtype)
    need_dkv = need_dcache or need_dnew
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, Hq, Lq]
    if dlse is not None:
        delta = delta - dlse.to(acc)

    def zeros(tensor, needed):
        return torch.zeros(tensor.shape, dtype=acc, device=q.device) if needed and tensor is not None else None

    dq = zeros(q, need_dq)
    dk_cache, dv_cache = zeros(k_cache, need_dcache), zeros(v_cache, need_dcache)
    dk_new, dv_new = zeros(k_new, need_dnew), zeros(v_new, need_dnew)
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
        if need_dq:
            dq[b] = torch.einsum("hqk,khd->qhd", ds, k) * softmax_scale
        if not need_dkv:
            continue
        dk = (torch.einsum("hqk,qhd->khd", ds, qb) * softmax_scale).unflatten(1, (kv_heads, group)).sum(2)
        dv = torch.einsum("hqk,qhd->khd", p, dob).unflatten(1, (kv_heads, group)).sum(2)
        pooled = counts[b] * block_size
        if need_dcache:
            dk_cache.index_add_(0, ids, dk[:pooled].reshape(-1, block_size, kv_heads, head_dim))
            dv_cache.index_add_(0, ids, dv[:pooled].reshape(-1, block_size, kv_heads, head_dim))
        if need_dnew:
            dk_new[b], dv_new[b] = dk[pooled:], dv[pooled:]
    return tuple(None if grad is None else grad.to(q.dtype) for grad in (dq, dk_cache, dv_cache, dk_new, dv_new))
