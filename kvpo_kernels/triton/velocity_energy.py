"""Triton kernels and launchers of ``velocity_energy``.

    E[b, t] = weight[b, t] * reduce_j (pred[b, t, j] - target[b, t, j])^2,   reduce = mean | sum over j in [0, N)

The launchers take pred/target ``[B, T, *]`` whose trailing dims are contiguous (the ops layer copies them
otherwise) and any B/T strides: row (b, t) starts at ``b * stride(0) + t * stride(1)`` and holds N contiguous
elements. Accumulation is in fp32 (fp64 for fp64 inputs).

Forward is a row-split reduction: ``splits`` programs per row each sum a fixed chunk into a partial, and a second
kernel adds the partials of a row in one fixed tree; no atomics, so E is bitwise repeatable (the partition depends
only on the shape and the device's SM count). When a row fits one program (splits == 1) the first kernel writes E.
Backward is one fused elementwise pass writing both gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreting
from .._device import sm_count

# Elements one program streams per loop step (and per backward program). A row longer than this is split over
# several programs whose partials the combine kernel adds; the interpreter tests lower it to run that path on CPU.
_MAX_BLOCK = 4096
_MAX_SPLITS = 1024


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _velocity_energy_forward_kernel(
    Out_ptr,  # FINAL: E [rows]; else partial sums [rows * SPLITS]
    Pred_ptr, pred_sb, pred_st,
    Target_ptr, target_sb, target_st,
    W_ptr, w_sb, w_st,
    T, N, CHUNK, SPLITS,
    HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Program (row, split) sums (p - t)^2 over j in [split * CHUNK, (split + 1) * CHUNK) of row = b * T + t."""
    pid = tl.program_id(0)
    row = pid // SPLITS
    split = pid % SPLITS
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    pred_row = Pred_ptr + b * pred_sb + t * pred_st
    target_row = Target_ptr + b * target_sb + t * target_st
    start = split.to(tl.int64) * CHUNK
    offsets = tl.arange(0, BLOCK)
    # BLOCK lanes of running sums, folded once at the end: a fixed order, and short error chains per lane.
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k in range(0, CHUNK, BLOCK):
        j = start + k + offsets
        mask = j < N
        p = tl.load(pred_row + j, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        q = tl.load(target_row + j, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        d = p - q
        acc += d * d
    total = tl.sum(acc, axis=0)
    if FINAL:
        if MEAN:
            total = total / N
        if HAS_WEIGHT:
            total = tl.load(W_ptr + b * w_sb + t * w_st).to(ACC) * total
        tl.store(Out_ptr + row, total)
    else:
        tl.store(Out_ptr + pid, total)


@triton.jit
def _velocity_energy_combine_kernel(
    E_ptr,  # [rows]
    Partial_ptr,  # [rows * SPLITS]
    W_ptr, w_sb, w_st,
    T, ROWS, N, SPLITS,
    HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, ROWS_BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
):
    """E[row] = w[b, t] * reduce(sum_s partial[row, s]) for ROWS_BLOCK rows; the sum is one fixed tree."""
    rows = tl.program_id(0) * ROWS_BLOCK + tl.arange(0, ROWS_BLOCK)
    cols = tl.arange(0, SPLITS_BLOCK)
    row_mask = rows < ROWS
    mask = row_mask[:, None] & (cols[None, :] < SPLITS)
    parts = tl.load(Partial_ptr + rows.to(tl.int64)[:, None] * SPLITS + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(parts, axis=1)
    if MEAN:
        total = total / N
    if HAS_WEIGHT:
        b = (rows // T).to(tl.int64)
        t = (rows % T).to(tl.int64)
        total = tl.load(W_ptr + b * w_sb + t * w_st, mask=row_mask, other=0.0).to(total.dtype) * total
    tl.store(E_ptr + rows, total, mask=row_mask)


@triton.jit
def _velocity_energy_backward_kernel(
    DPred_ptr, DTarget_ptr,  # [rows, N] contiguous, the inputs' dtype
    Pred_ptr, pred_sb, pred_st,
    Target_ptr, target_sb, target_st,
    G_ptr, g_sb, g_st,  # grad of E, [B, T]
    W_ptr, w_sb, w_st,
    T, N, CHUNKS,
    HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, WRITE_PRED: tl.constexpr, WRITE_TARGET: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """dpred = g[b, t] * w[b, t] * 2 (p - t) / (N if MEAN else 1), dtarget = -dpred, for BLOCK elements of a row."""
    pid = tl.program_id(0)
    row = pid // CHUNKS
    c = pid % CHUNKS
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    scale = tl.load(G_ptr + b * g_sb + t * g_st).to(ACC) * 2.0
    if HAS_WEIGHT:
        scale = scale * tl.load(W_ptr + b * w_sb + t * w_st).to(ACC)
    if MEAN:
        scale = scale / N
    j = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    p = tl.load(Pred_ptr + b * pred_sb + t * pred_st + j, mask=mask, other=0.0, eviction_policy="evict_first")
    q = tl.load(Target_ptr + b * target_sb + t * target_st + j, mask=mask, other=0.0, eviction_policy="evict_first")
    v = scale * (p.to(ACC) - q.to(ACC))
    out = row.to(tl.int64) * N + j
    if WRITE_PRED:
        tl.store(DPred_ptr + out, v.to(DPred_ptr.dtype.element_ty), mask=mask)
    if WRITE_TARGET:
        tl.store(DTarget_ptr + out, (-v).to(DTarget_ptr.dtype.element_ty), mask=mask)


def _row_shape(pred: torch.Tensor) -> Tuple[int, int, int]:
    batch, steps = pred.shape[0], pred.shape[1]
    rows = batch * steps
    return batch, steps, pred.numel() // rows if rows else 0


def _weight_strides(weight: Optional[torch.Tensor]) -> Tuple[int, int]:
    if weight is None:
        return 0, 0
    return (0, weight.stride(0)) if weight.dim() == 1 else (weight.stride(0), weight.stride(1))


def _target_programs(device: torch.device) -> int:
    """Programs to aim for in the forward: a few per SM on a GPU; a handful under the interpreter (tests the split)."""
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 8


def velocity_energy_forward(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                            mean: bool) -> torch.Tensor:
    """E ``[B, T]`` (fp32, fp64 for fp64 inputs). pred/target ``[B, T, *]`` with contiguous trailing dims;
    weight None, ``[T]`` or ``[B, T]`` in E's dtype."""
    batch, steps, n = _row_shape(pred)
    rows = batch * steps
    out_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    energy = torch.empty((batch, steps), dtype=out_dtype, device=pred.device)
    if rows == 0:
        return energy
    block = max(16, min(_MAX_BLOCK, triton.next_power_of_2(n)))
    blocks_per_row = triton.cdiv(n, block)
    splits = max(1, min(blocks_per_row, triton.cdiv(_target_programs(pred.device), rows), _MAX_SPLITS))
    chunk = triton.cdiv(blocks_per_row, splits) * block
    splits = triton.cdiv(n, chunk)
    w_sb, w_st = _weight_strides(weight)
    w = weight if weight is not None else energy  # never read without HAS_WEIGHT
    num_warps = 1 if triton_interpreting() else 8
    common = dict(HAS_WEIGHT=weight is not None, MEAN=mean, BLOCK=block, ACC=_acc_dtype(pred.dtype),
                  num_warps=num_warps)
    if splits == 1:
        _velocity_energy_forward_kernel[(rows,)](
            energy, pred, pred.stride(0), pred.stride(1), target, target.stride(0), target.stride(1),
            w, w_sb, w_st, steps, n, chunk, 1, FINAL=True, **common)
        return energy
    partials = torch.empty(rows * splits, dtype=out_dtype, device=pred.device)
    _velocity_energy_forward_kernel[(rows * splits,)](
        partials, pred, pred.stride(0), pred.stride(1), target, target.stride(0), target.stride(1),
        w, w_sb, w_st, steps, n, chunk, splits, FINAL=False, **common)
    rows_block = 16
    _velocity_energy_combine_kernel[(triton.cdiv(rows, rows_block),)](
        energy, partials, w, w_sb, w_st, steps, rows, n, splits, HAS_WEIGHT=weight is not None, MEAN=mean,
        ROWS_BLOCK=rows_block, SPLITS_BLOCK=max(2, triton.next_power_of_2(splits)), num_warps=4 if num_warps > 1 else 1)
    return energy


def velocity_energy_backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                             weight: Optional[torch.Tensor], mean: bool, need_pred: bool,
                             need_target: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dpred, dtarget), each ``pred.shape`` contiguous in pred's dtype, or None where not needed.

    grad: ``[B, T]`` gradient of E (any strides, E's dtype)."""
    batch, steps, n = _row_shape(pred)
    rows = batch * steps
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if need_pred else None
    grad_target = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if need_target else None
    if rows == 0 or not (need_pred or need_target):
        return grad_pred, grad_target
    block = max(16, min(_MAX_BLOCK, triton.next_power_of_2(n)))
    chunks = triton.cdiv(n, block)
    w_sb, w_st = _weight_strides(weight)
    placeholder = grad_pred if grad_pred is not None else grad_target  # never written when its WRITE_* is off
    _velocity_energy_backward_kernel[(rows * chunks,)](
        grad_pred if need_pred else placeholder, grad_target if need_target else placeholder,
        pred, pred.stride(0), pred.stride(1), target, target.stride(0), target.stride(1),
        grad, grad.stride(0), grad.stride(1), weight if weight is not None else grad, w_sb, w_st,
        steps, n, chunks, HAS_WEIGHT=weight is not None, MEAN=mean, WRITE_PRED=need_pred,
        WRITE_TARGET=need_target, BLOCK=block, ACC=_acc_dtype(pred.dtype),
        num_warps=1 if triton_interpreting() else 8)
    return grad_pred, grad_target
