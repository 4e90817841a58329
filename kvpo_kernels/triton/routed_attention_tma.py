"""Tensor-descriptor (TMA) forward of routed attention for sm_90, beside the pointer forward in routed_attention.py.

Layouts (as the pointer forward; the descriptor rules below restrict the strides):
    q, out      [B, Lq, Hq, D]   one 2-D descriptor [Lq, D] per (sequence, head), rows = queries
    pool        [N, S, Hkv, D]   one 3-D descriptor [N, S, D] per kv head (the [N, S, Hkv * D] pool seen at one
                                 head's column offset): a block's rows past S and the columns past D are zero-filled
                                 by the descriptor, so no load carries a mask; only the scores of a block's tail
                                 tile are masked (to -inf)
    block_table int [B, M] (preloaded into registers, one row per program), block_counts int [B]
    lse         fp32 [B, Hq, Lq] (natural log)

Each program (one query tile of one head of one sequence) walks all ``count * cdiv(S, BLOCK_N)`` (block, key tile)
pairs of its sequence as ONE flat loop: no pipeline drain at block boundaries, and the loop is what Triton's Hopper
warp specialisation and multi-buffering act on. That pass needs exactly one loop, the table in registers (a table
load inside the loop aborts it) and one descriptor per operand (choosing between two inside the loop silently drops
warp specialisation and multi-buffering).

The new chunk (k_new / v_new) therefore cannot be one more span of the loop. It runs as a second launch of the same
kernel, with the chunk seen as a pool of B blocks of Ln tokens and the identity table, that *resumes* the online
softmax from the first pass: pass 1 stores its normalised fp32 output ``o1`` and ``lse1``; ``(m, l, acc) = (lse1 *
log2(e), 1, o1)`` is the same softmax state as pass 1's final one (acc / l = o1, m + log2(l) = lse1 in base 2), and
pass 2 continues from it exactly as if the chunk's tiles had followed in the loop.

Why this rather than pool slots for the chunk, on paper at G8 (benchmarks/bench_routed_attention.py: B = 8,
Lq = 4680, 12 heads of 128, 18,720 pool keys + a 4,680-key chunk): both cost about the same, ~0.8% of the forward.
The second pass adds a fp32 write + read of ``out`` and a re-read of q, 8 * 4680 * 12 * 128 * (8 + 2) bytes
~ 0.58 GB ~ 0.12 ms at H200 bandwidth, plus one launch and one pipeline warm-up per program, against ~5.4e12 flops
of attention ~ 15 ms at the 365 TFLOP/s a plain block-table Triton forward measured on G8 (ANCHORS.md). Pool slots
write the chunk's K and V into the pool (the same ~0.46 GB), but this launcher receives the pool read-only: only
the caller (the cache, which writes the chunk there anyway) could do it, which changes the op's contract. The
second pass is the simpler of the two and changes nothing in the hot loop. (Arithmetic, not a measurement: no GPU
run yet.)

Numerics as the pointer forward: fp32 scores, statistics and accumulators; base-2 softmax with the scale folded into
``qk_scale``; fp32 inputs use IEEE dots. A tile whose scores are all -inf (a pool holding -inf keys) keeps the
running max at -inf and subtracts 0 instead, so it adds nothing instead of NaN. Empty rows: out = 0, lse = -inf.

Descriptor rules (checked by the launcher, a ValueError otherwise): unit stride on D; every other stride of q,
k_cache, v_cache, k_new, v_new and every base pointer a multiple of 16 bytes (so D must be a multiple of 8 for
fp16 / bf16 and of 4 for fp32 with packed heads); M <= 1024 (the table row lives in registers).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreting
from .._device import LOG2E, launch_device
from .routed_attention import (_AUTOTUNE, _DO_BENCH, _LOG2E, _MAX_TIMED, _check_grid, _online_softmax_step,
                               _precision, _shared_memory_budget)

# Warp specialisation on Hopper applies to 4-warp programs only (one consumer warpgroup next to the producer).
if triton_interpreting():
    _TMA_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
else:
    _TMA_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=s)
                    for m, n, s in ((128, 64, 2), (128, 128, 2), (64, 64, 2), (64, 32, 1))]
_MAX_TABLE = 1024


def _prune_tma_configs(configs, named_args, **kwargs):
    """Drop configs whose q tile plus ``num_stages`` K/V tile pairs do not fit in shared memory; keep the first
    ``_MAX_TIMED`` for the autotuner (the first alone with ``KVPO_TRITON_AUTOTUNE=0``), as the pointer kernels do."""
    q = named_args["Q_ptr"]
    row_bytes = kwargs["BLOCK_D"] * q.element_size()
    budget = _shared_memory_budget(q.device.index if q.device.index is not None else 0)

    def smem(config):
        return (config.kwargs["BLOCK_M"] + 2 * config.num_stages * config.kwargs["BLOCK_N"]) * row_bytes

    fitting = [config for config in configs if smem(config) <= budget] or configs[-1:]
    return fitting[:_MAX_TIMED] if _AUTOTUNE else fitting[:1]


@triton.jit
def _tma_tile(acc, m_i, l_i, q, k_desc, v_desc, blk, start, offs_n, S, qk_scale,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over keys ``start .. start + BLOCK_N`` of pool block ``blk`` (rows past S are zero
    from the descriptor; their scores are set to -inf here)."""
    k = k_desc.load([blk, start, 0]).reshape(BLOCK_N, BLOCK_D)
    v = v_desc.load([blk, start, 0]).reshape(BLOCK_N, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where((offs_n < S - start)[None, :], s, float("-inf"))
    return _online_softmax_step(acc, m_i, l_i, s, v, PRECISION)


@triton.autotune(configs=_TMA_CONFIGS, key=["Lq", "HEAD_DIM", "GROUP", "RESUME"],
                 prune_configs_by={"early_config_prune": _prune_tma_configs}, do_bench=_DO_BENCH)
@triton.jit
def _routed_attention_fwd_tma_kernel(
    Out_ptr, Lse_ptr, Init_ptr, Q_ptr, K_ptr, V_ptr, Table_ptr, Counts_ptr,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_qb, stride_qm, stride_qh,
    stride_kn, stride_ks, stride_kh,
    stride_vn, stride_vs, stride_vh,
    stride_tb, stride_ti,
    Lq, N, S, M, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TABLE_WIDTH: tl.constexpr, RESUME: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, m, h] = softmax_k(q[b, m, h] . K_b[k] * scale) @ V_b;  lse[b, h, m] = logsumexp_k (natural log).

    One program per (BLOCK_M query tile, query head h, sequence b); K_b is the S keys of each of the
    ``Counts[b]`` blocks ``Table[b, :]`` of the pool ``K [N, S, Hkv, D]``. RESUME: start from the softmax state
    of an earlier pass, its fp32 output in ``Init [B, Lq, Hq, D]`` (Out's strides) and its lse in ``Lse`` (read,
    then overwritten with the combined one).
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq

    q_desc = tl.make_tensor_descriptor(Q_ptr + b * stride_qb + h * stride_qh, shape=[Lq, HEAD_DIM],
                                       strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K_ptr + hk * stride_kh, shape=[N, S, HEAD_DIM],
                                       strides=[stride_kn, stride_ks, 1], block_shape=[1, BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V_ptr + hk * stride_vh, shape=[N, S, HEAD_DIM],
                                       strides=[stride_vn, stride_vs, 1], block_shape=[1, BLOCK_N, BLOCK_D])
    q = q_desc.load([pid_m * BLOCK_M, 0])

    row_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    lse_ptrs = Lse_ptr + b * stride_lb + h * stride_lh + offs_m
    if RESUME:
        lse_init = tl.load(lse_ptrs, mask=m_ok, other=float("-inf"))
        # (m, l, acc) = (lse1 in base 2, 1, o1) is pass 1's final state. An empty pass-1 row (lse1 = -inf, o1 = 0)
        # needs no special case: the first finite score gives alpha = exp2(-inf) = 0, which drops that l = 1.
        m_i = lse_init * _LOG2E
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        acc = tl.load(Init_ptr + row_offs, mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The table row, in registers: entry i is picked by a masked sum, not loaded inside the loop.
    slots = tl.arange(0, TABLE_WIDTH)
    table = tl.load(Table_ptr + b * stride_tb + slots * stride_ti, mask=slots < M, other=0).to(tl.int32)
    tiles = tl.cdiv(S, BLOCK_N)
    pairs = tl.load(Counts_ptr + b).to(tl.int32) * tiles
    for j in tl.range(0, pairs, warp_specialize=True):
        i = j // tiles
        blk = tl.sum(tl.where(slots == i, table, 0))
        acc, m_i, l_i = _tma_tile(acc, m_i, l_i, q, k_desc, v_desc, blk, (j - i * tiles) * BLOCK_N, offs_n, S,
                                  qk_scale, BLOCK_N, BLOCK_D, PRECISION)

    # A row with no keys has l_i = 0 and m_i = -inf: write 0 and -inf instead of 0/0.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / _LOG2E)
    # A +inf score makes m = +inf and l = NaN: lse is +inf, as logsumexp says (the pointer forward's rule), so the
    # backward's P = exp(s - lse) is 0 for the row's finite scores.
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    tl.store(Out_ptr + row_offs, out.to(Out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(lse_ptrs, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _descriptor_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global memory for the descriptors the kernel builds on the device (128 bytes per descriptor and program),
    from PyTorch's caching allocator on the current device and stream."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_allocator() -> None:
    """Device-side descriptors need a Triton allocator. Install ours unless the caller installed their own
    (Triton's default raises on use). Checked at every launch: the allocator is a context variable, and a new thread
    starts from Triton's default again. The interpreter builds descriptors on the host and needs none."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)


def _check_descriptor_layout(name: str, tensor: torch.Tensor) -> None:
    """TMA: unit stride on the last dim, base and every other stride a multiple of 16 bytes (size-1 dims too: their
    strides go into the descriptors as given)."""
    size = tensor.element_size()
    if tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        raise ValueError(f"routed_attention: {name} must have unit stride on D for the triton tma forward, got "
                         f"strides {tuple(tensor.stride())}")
    if tensor.data_ptr() % 16 or any(stride * size % 16 for stride in tensor.stride()[:-1]):
        raise ValueError(f"routed_attention: {name} needs a 16-byte aligned base and strides that are multiples of "
                         f"16 bytes for the triton tma forward (D a multiple of {16 // size}), got strides "
                         f"{tuple(tensor.stride())} of {size}-byte elements")


def _check_inputs(q, k_cache, v_cache, block_table, k_new, v_new) -> None:
    if block_table.shape[1] > _MAX_TABLE:
        raise ValueError(f"routed_attention: block_table width M ({block_table.shape[1]}) must be <= {_MAX_TABLE} "
                         f"for the triton tma forward (the table row is held in registers)")
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    named += [("k_new", k_new), ("v_new", v_new)] if k_new is not None and k_new.shape[1] > 0 else []
    for name, tensor in named:
        if tensor.numel() > 0:
            _check_descriptor_layout(name, tensor)


def _launch(out, lse, init, q, keys, values, table, counts, softmax_scale, resume: bool) -> None:
    batch, q_len, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = keys.shape
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), q_heads, batch)  # noqa: E731
    _routed_attention_fwd_tma_kernel[grid](
        out, lse, init, q, keys, values, table, counts,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        q.stride(0), q.stride(1), q.stride(2), *keys.stride()[:3], *values.stride()[:3],
        table.stride(0), table.stride(1),
        q_len, num_blocks, block_size, table.shape[1], q_heads // kv_heads, softmax_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        TABLE_WIDTH=triton.next_power_of_2(max(table.shape[1], 1)), RESUME=resume, PRECISION=_precision(q.dtype),
    )


def routed_attention_forward_tma(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_table: torch.Tensor, block_counts: torch.Tensor,
                                 k_new: Optional[torch.Tensor], v_new: Optional[torch.Tensor],
                                 softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward through tensor descriptors, with the contract of ``routed_attention_forward``: inputs validated
    by the caller; returns out [B, Lq, Hq, D] (q's dtype, contiguous) and lse [B, Hq, Lq] fp32. Raises ValueError
    for layouts the descriptors cannot describe (see the module docstring)."""
    batch, q_len, q_heads, head_dim = q.shape
    has_new = k_new is not None and k_new.shape[1] > 0
    out = torch.empty((batch, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    _check_grid(batch, q_heads)
    _check_inputs(q, k_cache, v_cache, block_table, k_new, v_new)
    block_counts = block_counts.contiguous()
    # With a new chunk, pass 1 keeps its output in fp32 for pass 2 to resume from.
    first = torch.empty(out.shape, dtype=torch.float32, device=q.device) if has_new else out
    with launch_device(q.device):
        if q.is_cuda:
            _install_allocator()
        _launch(first, lse, first, q, k_cache, v_cache, block_table, block_counts, softmax_scale, resume=False)
        if has_new:
            # The chunk as a pool of B blocks of Ln tokens; sequence b reads block b.
            identity = torch.arange(batch, dtype=torch.int32, device=q.device).view(batch, 1)
            ones = torch.ones(batch, dtype=torch.int32, device=q.device)
            _launch(out, lse, first, q, k_new, v_new, identity, ones, softmax_scale, resume=True)
    return out, lse
