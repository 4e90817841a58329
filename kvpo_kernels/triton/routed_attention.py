"""Triton kernels for routed (paged) attention: FlashAttention-2 forward, and a backward whose pool gradients are
deterministic sums with no atomics.

Layouts (any strides; Triton specialises unit strides):
    q, out, dq           [B, Lq, Hq, D]
    k_cache, v_cache     [N, S, Hkv, D]   pool of N blocks of S tokens (S any positive int)
    k_new, v_new         [B, Ln, Hkv, D]  per-sequence chunk read after the blocks
    block_table          int [B, M], block_counts int [B]
    lse, delta           fp32 [B, Hq, Lq] (natural log)

Sequence b's keys are the S tokens of each of its ``block_counts[b]`` table blocks, in table order, then its Ln
new tokens. Query head h reads kv head ``h // GROUP``. Because there is no mask inside a sequence's key list, a
block's key tiles are independent of where the block sits in the table: only the tail tile of each block (and of
the new chunk) is masked, and the backward of a pool block does not need the table position of its readers.

The forward and dQ kernels walk ``count + HAS_NEW`` spans in ONE loop: span i < count is pool block
``table[b, i]``, span count is the new chunk; each span picks its base pointer, row stride and length. A second
pipelined loop for the chunk after the pool loop made ptxas serialize every wgmma of the kernel on sm_90 (warning
C7515); one loop keeps them asynchronous (tests/test_routed_attention.py compiles every config for sm_90).

Numerics: scores, the online softmax, every accumulator and lse are fp32; the softmax runs in base 2 with the scale
folded into ``qk_scale = softmax_scale * log2(e)``. fp32 inputs use IEEE dots (no TF32), so the fp32 path matches
the reference to ~1e-6. Probabilities are rounded to the input dtype before the P @ V and dS @ K dots, as in
FlashAttention-2. A -inf key scores -inf; a row whose keys all score -inf gets out = 0 / lse = -inf like an empty
row would (the float64 reference gives NaN there).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreting
from .._device import LOG2E, launch_device

_LOG2E = tl.constexpr(LOG2E)


def _configs(entries):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in entries]


# The interpreter runs one config (no autotuning on CPU); 32 x 32 tiles keep the numpy work per program small while
# still exercising full tiles plus a masked tail for S = 257 and 1560. On CUDA a small FlashAttention-2 style list.
if triton_interpreting():
    _FWD_CONFIGS = _DQ_CONFIGS = _DKDV_CONFIGS = _configs([(32, 32, 4, 1)])
else:
    _FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 4, 2), (64, 32, 4, 1)])
    # dQ: a query tile that stays in registers against streamed key tiles, like the forward.
    _DQ_CONFIGS = _configs([(128, 32, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1)])
    # dK/dV: a key tile (BLOCK_N) that stays in registers against streamed query tiles (BLOCK_M).
    _DKDV_CONFIGS = _configs([(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 1),
                              (16, 32, 4, 1)])

# Each list is in order of preference (the first ones checked spill-free at D = 128 by compiling for sm_90); the
# autotuner times at most the first _MAX_TIMED configs that fit in shared memory, so it compiles few variants per
# dtype / head dim / group. KVPO_TRITON_AUTOTUNE=0 takes the first fitting config untimed (the GPU test run sets it
# to stay within its time budget).
_MAX_TIMED = 3
_AUTOTUNE = os.environ.get("KVPO_TRITON_AUTOTUNE", "1") != "0"


def _untimed(kernel_call, quantiles):
    """The benchmarker when autotuning is off: Triton would still time the one pruned config (8+ launches and as
    many 256 MB L2 flushes per new key, slow under compute-sanitizer); report it as instant instead."""
    return [0.0] * len(quantiles)


_DO_BENCH = None if _AUTOTUNE else _untimed


@functools.lru_cache(maxsize=None)
def _shared_memory_budget(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _fitting_configs(resident: str):
    """An ``early_config_prune`` that drops configs whose tiles cannot fit in shared memory (D = 256, fp32).

    ``resident`` names the tile size that stays on chip (two [tile, D] operands: q and dO, or k and v); the other
    dimension's two operands stream through ``num_stages`` buffers.
    """
    streamed = "BLOCK_N" if resident == "BLOCK_M" else "BLOCK_M"

    def prune(configs, named_args, **kwargs):
        q = named_args["Q_ptr"]
        block_d = max(triton.next_power_of_2(kwargs["HEAD_DIM"]), 16)
        budget = _shared_memory_budget(q.device.index if q.device.index is not None else 0)

        def smem(config):
            tiles = 2 * config.kwargs[resident] + 2 * config.num_stages * config.kwargs[streamed]
            return tiles * block_d * q.element_size()

        fitting = [config for config in configs if smem(config) <= budget] or configs[-1:]
        return fitting[:_MAX_TIMED] if _AUTOTUNE else fitting[:1]

    return {"early_config_prune": prune}


@triton.jit
def _tile_ptrs(base_ptr, rows, row_stride, offs_d, d_stride):
    """Pointers of a [rows, BLOCK_D] tile: ``base + rows * row_stride + d * d_stride``."""
    return base_ptr + rows[:, None] * row_stride + offs_d[None, :] * d_stride


@triton.jit
def _load_tile(ptrs, rows_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking rows only when asked and the head dim only when it is padded."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _span(i, count, b, hk, offs_n, offs_d, Kc_ptr, Vc_ptr, Kn_ptr, Vn_ptr, Table_ptr, stride_tb, stride_ti,
          stride_kcn, stride_kcs, stride_kch, stride_kcd, stride_vcn, stride_vcs, stride_vch, stride_vcd,
          stride_knb, stride_knm, stride_knh, stride_knd, stride_vnb, stride_vnm, stride_vnh, stride_vnd,
          S, Ln, HAS_NEW: tl.constexpr):
    """Span i of sequence b's key list: (first K tile pointers, first V tile pointers, K row stride, V row stride,
    length). Spans below ``count`` are pool blocks ``table[b, i]``; span ``count`` (with HAS_NEW) is the chunk."""
    if HAS_NEW:
        in_pool = i < count
        # int64: block id * block stride passes 2^31 elements for pools of a few GB. Span count reads no table entry.
        blk = tl.load(Table_ptr + b * stride_tb + i * stride_ti, mask=in_pool, other=0).to(tl.int64)
        k_base = tl.where(in_pool, Kc_ptr + blk * stride_kcn + hk * stride_kch,
                          Kn_ptr + b * stride_knb + hk * stride_knh)
        v_base = tl.where(in_pool, Vc_ptr + blk * stride_vcn + hk * stride_vch,
                          Vn_ptr + b * stride_vnb + hk * stride_vnh)
        k_rows = tl.where(in_pool, stride_kcs, stride_knm)
        v_rows = tl.where(in_pool, stride_vcs, stride_vnm)
        k_ptrs = _tile_ptrs(k_base, offs_n, k_rows, offs_d, tl.where(in_pool, stride_kcd, stride_knd))
        v_ptrs = _tile_ptrs(v_base, offs_n, v_rows, offs_d, tl.where(in_pool, stride_vcd, stride_vnd))
        length = tl.where(in_pool, S, Ln)
    else:
        blk = tl.load(Table_ptr + b * stride_tb + i * stride_ti).to(tl.int64)
        k_rows = stride_kcs
        v_rows = stride_vcs
        k_ptrs = _tile_ptrs(Kc_ptr + blk * stride_kcn + hk * stride_kch, offs_n, k_rows, offs_d, stride_kcd)
        v_ptrs = _tile_ptrs(Vc_ptr + blk * stride_vcn + hk * stride_vch, offs_n, v_rows, offs_d, stride_vcd)
        length = S
    return k_ptrs, v_ptrs, k_rows, v_rows, length


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n_valid, offs_n, d_ok, qk_scale,
              MASK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over a key tile; ``n_valid`` keys of the tile are real when MASK_N."""
    n_ok = offs_n < n_valid
    k = _load_tile(k_ptrs, n_ok, d_ok, MASK_N, EVEN_D)
    v = _load_tile(v_ptrs, n_ok, d_ok, MASK_N, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return _online_softmax_step(acc, m_i, l_i, s, v, PRECISION)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """Fold the scores ``s [BLOCK_M, BLOCK_N]`` (log2 domain, masked keys at -inf) and their values ``v`` into the
    running max ``m_i``, sum ``l_i`` and unnormalised output ``acc`` (fp32); shared by both forward kernels."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys so far all scored -inf (a -inf key, or a masked tile) keeps m = -inf: subtracting it would
    # give exp2(-inf + inf) = NaN. Subtract 0 there instead: p = exp2(-inf) = 0 and alpha = exp2(m_i) = 0.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_span(acc, m_i, l_i, q, k_ptrs, v_ptrs, length, k_step, v_step, offs_n, d_ok, qk_scale,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Walk ``length`` contiguous keys (one pool block or the new chunk): unmasked full tiles, then one tail."""
    full_end = (length // BLOCK_N) * BLOCK_N
    for _start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, BLOCK_N, offs_n, d_ok, qk_scale,
                                  False, EVEN_D, PRECISION)
        k_ptrs += k_step
        v_ptrs += v_step
    if full_end < length:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, length - full_end, offs_n, d_ok, qk_scale,
                                  True, EVEN_D, PRECISION)
    return acc, m_i, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=["Lq", "HEAD_DIM", "GROUP"],
                 prune_configs_by=_fitting_configs("BLOCK_M"), do_bench=_DO_BENCH)
@triton.jit
def _routed_attention_fwd_kernel(
    Out_ptr, Lse_ptr, Q_ptr, Kc_ptr, Vc_ptr, Kn_ptr, Vn_ptr, Table_ptr, Counts_ptr,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kcn, stride_kcs, stride_kch, stride_kcd,
    stride_vcn, stride_vcs, stride_vch, stride_vcd,
    stride_knb, stride_knm, stride_knh, stride_knd,
    stride_vnb, stride_vnm, stride_vnh, stride_vnd,
    stride_tb, stride_ti,
    Lq, Ln, S, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NEW: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, m, h] = softmax_k(q[b, m, h] . K_b[k] * scale) @ V_b;  lse[b, h, m] = logsumexp_k (natural log).

    One program per (BLOCK_M query tile, query head h, sequence b). K_b/V_b are read in place from the pool
    (through the block table) and from the new chunk; nothing is copied. No keys: out = 0, lse = -inf.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64 like b: a head-major view's head stride spans a whole plane
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row * row stride can pass 2^31
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM

    q = _load_tile(_tile_ptrs(Q_ptr + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd),
                   m_ok, d_ok, True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    count = tl.load(Counts_ptr + b)
    num_spans = count
    if HAS_NEW:
        num_spans += 1
    for i in range(0, num_spans):
        k_ptrs, v_ptrs, k_rows, v_rows, length = _span(
            i, count, b, hk, offs_n, offs_d, Kc_ptr, Vc_ptr, Kn_ptr, Vn_ptr, Table_ptr, stride_tb, stride_ti,
            stride_kcn, stride_kcs, stride_kch, stride_kcd, stride_vcn, stride_vcs, stride_vch, stride_vcd,
            stride_knb, stride_knm, stride_knh, stride_knd, stride_vnb, stride_vnm, stride_vnh, stride_vnd,
            S, Ln, HAS_NEW)
        acc, m_i, l_i = _fwd_span(acc, m_i, l_i, q, k_ptrs, v_ptrs, length, BLOCK_N * k_rows, BLOCK_N * v_rows,
                                  offs_n, d_ok, qk_scale, BLOCK_N, EVEN_D, PRECISION)

    # A sequence with no keys has l_i = 0 and m_i = -inf: write 0 and -inf instead of 0/0.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / _LOG2E)
    # A +inf score (an inf key) makes m = +inf and l = NaN: its lse is +inf, as logsumexp says, so that the
    # backward's P = exp(s - lse) is 0 for the row's finite scores (their gradients stay finite, as in the truth).
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    o_ptrs = _tile_ptrs(Out_ptr + b * stride_ob + h * stride_oh, offs_m, stride_om, offs_d, 1)
    tl.store(o_ptrs, out.to(Out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse_ptr + b * stride_lb + h * stride_lh + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(
    Delta_ptr, DO_ptr, O_ptr, DLse_ptr,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_glb, stride_glh, stride_glm,
    Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, m] = sum_d dO * O - dlse.

    With s the scores, dL/ds = P * (dP - rowsum(dO * O)) + P * dlse, so a gradient flowing into lse folds into
    delta and the dQ / dK kernels need no extra term.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    do = tl.load(_tile_ptrs(DO_ptr + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, stride_dod),
                 mask=mask, other=0.0).to(tl.float32)
    o = tl.load(_tile_ptrs(O_ptr + b * stride_ob + h * stride_oh, offs_m, stride_om, offs_d, 1),
                mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(do * o, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse_ptr + b * stride_glb + h * stride_glh + offs_m * stride_glm, mask=offs_m < Lq,
                         other=0.0)
    tl.store(Delta_ptr + b * stride_lb + h * stride_lh + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, n_valid, offs_n, d_ok, qk_scale,
             MASK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """dq += (P * (dO V^T - delta)) @ K for one key tile, with P recomputed from lse (log2 domain)."""
    n_ok = offs_n < n_valid
    k = _load_tile(k_ptrs, n_ok, d_ok, MASK_N, EVEN_D)
    v = _load_tile(v_ptrs, n_ok, d_ok, MASK_N, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASK_N:
        # The zero-loaded tail keys score 0: for a row whose real scores are all below ~-88 (fp32 exp overflow;
        # ~-11 once P is rounded to fp16) exp2(0 - lse2) is inf, and inf * 0 (their zero K rows) is NaN.
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_span(dq, q, do, lse2, delta, k_ptrs, v_ptrs, length, k_step, v_step, offs_n, d_ok, qk_scale,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    full_end = (length // BLOCK_N) * BLOCK_N
    for _start in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, BLOCK_N, offs_n, d_ok, qk_scale,
                      False, EVEN_D, PRECISION)
        k_ptrs += k_step
        v_ptrs += v_step
    if full_end < length:
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, length - full_end, offs_n, d_ok, qk_scale,
                      True, EVEN_D, PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["Lq", "HEAD_DIM", "GROUP"],
                 prune_configs_by=_fitting_configs("BLOCK_M"), do_bench=_DO_BENCH)
@triton.jit
def _routed_attention_dq_kernel(
    DQ_ptr, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr, Kc_ptr, Vc_ptr, Kn_ptr, Vn_ptr, Table_ptr, Counts_ptr,
    stride_dqb, stride_dqm, stride_dqh,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,
    stride_kcn, stride_kcs, stride_kch, stride_kcd,
    stride_vcn, stride_vcs, stride_vch, stride_vcd,
    stride_knb, stride_knm, stride_knh, stride_knd,
    stride_vnb, stride_vnm, stride_vnh, stride_vnd,
    stride_tb, stride_ti,
    Lq, Ln, S, GROUP, softmax_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NEW: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq[b, m, h] = scale * sum_k P[m, k] (dP[m, k] - delta[m]) K_b[k]; the same one-loop walk as the forward."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64 like b: a head-major view's head stride spans a whole plane
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM

    q = _load_tile(_tile_ptrs(Q_ptr + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd),
                   m_ok, d_ok, True, EVEN_D)
    do = _load_tile(_tile_ptrs(DO_ptr + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, stride_dod),
                    m_ok, d_ok, True, EVEN_D)
    # Padding rows get lse = +inf, hence P = 0 and no contribution.
    lse2 = tl.load(Lse_ptr + b * stride_lb + h * stride_lh + offs_m, mask=m_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta_ptr + b * stride_lb + h * stride_lh + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    count = tl.load(Counts_ptr + b)
    num_spans = count
    if HAS_NEW:
        num_spans += 1
    for i in range(0, num_spans):
        k_ptrs, v_ptrs, k_rows, v_rows, length = _span(
            i, count, b, hk, offs_n, offs_d, Kc_ptr, Vc_ptr, Kn_ptr, Vn_ptr, Table_ptr, stride_tb, stride_ti,
            stride_kcn, stride_kcs, stride_kch, stride_kcd, stride_vcn, stride_vcs, stride_vch, stride_vcd,
            stride_knb, stride_knm, stride_knh, stride_knd, stride_vnb, stride_vnm, stride_vnh, stride_vnd,
            S, Ln, HAS_NEW)
        dq = _dq_span(dq, q, do, lse2, delta, k_ptrs, v_ptrs, length, BLOCK_N * k_rows, BLOCK_N * v_rows,
                      offs_n, d_ok, qk_scale, BLOCK_N, EVEN_D, PRECISION)

    dq_ptrs = _tile_ptrs(DQ_ptr + b * stride_dqb + h * stride_dqh, offs_m, stride_dqm, offs_d, 1)
    tl.store(dq_ptrs, (dq * softmax_scale).to(DQ_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_from_sequence(dk, dv, k, v, b, hk, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr,
                        stride_qb, stride_qm, stride_qh, stride_qd,
                        stride_dob, stride_dom, stride_doh, stride_dod,
                        stride_lb, stride_lh,
                        Lq, GROUP, qk_scale, offs_m, offs_d, d_ok,
                        BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Add sequence b's contribution to a key tile's dK (unscaled) and dV: all GROUP query heads, all query tiles.

    Keys past the end of the tile's span are zero-loaded; their rows are computed but never stored.
    """
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q_ptr + b * stride_qb + h * stride_qh
        do_base = DO_ptr + b * stride_dob + h * stride_doh
        row_base = b * stride_lb + h * stride_lh
        # Pointers are rebuilt from scalar bases each step: loop-carried [BLOCK_M, BLOCK_D] pointer tensors would
        # hold 64-bit registers per element next to the resident k, v, dk, dv tiles and spill.
        for start_m in range(0, Lq, BLOCK_M):
            rows = start_m + offs_m
            m_ok = rows < Lq
            q = _load_tile(_tile_ptrs(q_base, rows, stride_qm, offs_d, stride_qd), m_ok, d_ok, True, EVEN_D)
            do = _load_tile(_tile_ptrs(do_base, rows, stride_dom, offs_d, stride_dod), m_ok, d_ok, True, EVEN_D)
            lse2 = tl.load(Lse_ptr + row_base + rows, mask=m_ok, other=float("inf")) * _LOG2E
            delta = tl.load(Delta_ptr + row_base + rows, mask=m_ok, other=0.0)
            # Transposed scores [BLOCK_N, BLOCK_M]: the key tile stays in registers, queries stream.
            p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
            # Padding query rows are zero: a -inf key scores 0 * -inf = NaN against them, and P^T dO would carry
            # that NaN (times their zero dO) into every key's dV. Their lse = +inf alone does not cover it.
            p_t = tl.where(m_ok[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["Lq", "HEAD_DIM", "GROUP"],
                 prune_configs_by=_fitting_configs("BLOCK_N"), do_bench=_DO_BENCH)
@triton.jit
def _routed_attention_dkdv_pool_kernel(
    DKc_ptr, DVc_ptr, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr, Kc_ptr, Vc_ptr, Readers_ptr, ReaderPtr_ptr, BlockOrder_ptr,
    stride_dkn, stride_dks, stride_dkh,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,
    stride_kcn, stride_kcs, stride_kch, stride_kcd,
    stride_vcn, stride_vcs, stride_vch, stride_vcd,
    Lq, S, GROUP, softmax_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK/dV of one (key tile, kv head, pool block): the sum over every table entry that reads the block.

    ``Readers[ReaderPtr[n]:ReaderPtr[n + 1]]`` lists the sequence of each table entry holding block n, in
    (sequence, table position) order: a fixed summation order, so a shared block's gradient is bitwise repeatable,
    and each output tile has exactly one writer (no atomics). A block read twice by one sequence appears twice.
    Blocks nobody reads get zeros. Grid axis 2 walks ``BlockOrder`` (most-read blocks first).
    """
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    blk = tl.load(BlockOrder_ptr + tl.program_id(2)).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S
    d_ok = offs_d < HEAD_DIM
    k = _load_tile(_tile_ptrs(Kc_ptr + blk * stride_kcn + hk * stride_kch, offs_n, stride_kcs, offs_d, stride_kcd),
                   n_ok, d_ok, True, EVEN_D)
    v = _load_tile(_tile_ptrs(Vc_ptr + blk * stride_vcn + hk * stride_vch, offs_n, stride_vcs, offs_d, stride_vcd),
                   n_ok, d_ok, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = tl.load(ReaderPtr_ptr + blk)
    hi = tl.load(ReaderPtr_ptr + blk + 1)
    for e in range(lo, hi):
        b = tl.load(Readers_ptr + e).to(tl.int64)
        dk, dv = _dkdv_from_sequence(dk, dv, k, v, b, hk, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr,
                                     stride_qb, stride_qm, stride_qh, stride_qd,
                                     stride_dob, stride_dom, stride_doh, stride_dod,
                                     stride_lb, stride_lh, Lq, GROUP, qk_scale, offs_m, offs_d, d_ok,
                                     BLOCK_M, EVEN_D, PRECISION)
    mask = n_ok[:, None] & d_ok[None, :]
    out_ptrs = _tile_ptrs(blk * stride_dkn + hk * stride_dkh, offs_n, stride_dks, offs_d, 1)
    tl.store(DKc_ptr + out_ptrs, (dk * softmax_scale).to(DKc_ptr.dtype.element_ty), mask=mask)
    tl.store(DVc_ptr + out_ptrs, dv.to(DVc_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_DKDV_CONFIGS, key=["Lq", "HEAD_DIM", "GROUP"],
                 prune_configs_by=_fitting_configs("BLOCK_N"), do_bench=_DO_BENCH)
@triton.jit
def _routed_attention_dkdv_new_kernel(
    DKn_ptr, DVn_ptr, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr, Kn_ptr, Vn_ptr,
    stride_dkb, stride_dkm, stride_dkh,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,
    stride_knb, stride_knm, stride_knh, stride_knd,
    stride_vnb, stride_vnm, stride_vnh, stride_vnd,
    Lq, Ln, GROUP, softmax_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk_new/dv_new of one (new-key tile, kv head, sequence): only sequence b reads its own chunk."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Ln
    d_ok = offs_d < HEAD_DIM
    k = _load_tile(_tile_ptrs(Kn_ptr + b * stride_knb + hk * stride_knh, offs_n, stride_knm, offs_d, stride_knd),
                   n_ok, d_ok, True, EVEN_D)
    v = _load_tile(_tile_ptrs(Vn_ptr + b * stride_vnb + hk * stride_vnh, offs_n, stride_vnm, offs_d, stride_vnd),
                   n_ok, d_ok, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_from_sequence(dk, dv, k, v, b, hk, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr,
                                 stride_qb, stride_qm, stride_qh, stride_qd,
                                 stride_dob, stride_dom, stride_doh, stride_dod,
                                 stride_lb, stride_lh, Lq, GROUP, qk_scale, offs_m, offs_d, d_ok,
                                 BLOCK_M, EVEN_D, PRECISION)
    mask = n_ok[:, None] & d_ok[None, :]
    out_ptrs = _tile_ptrs(b * stride_dkb + hk * stride_dkh, offs_n, stride_dkm, offs_d, 1)
    tl.store(DKn_ptr + out_ptrs, (dk * softmax_scale).to(DKn_ptr.dtype.element_ty), mask=mask)
    tl.store(DVn_ptr + out_ptrs, dv.to(DVn_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32 (10-bit mantissa): the fp32 contract is 1e-4 relative.
    return "ieee" if dtype == torch.float32 else "tf32"


# CUDA limits grid axes 1 and 2 to 65535 programs: heads and sequences go there (checked below), pool blocks are
# launched in chunks of at most this many (a multiple of 4 keeps each chunk's int32 block_order slice 16-byte aligned).
_MAX_GRID_YZ = 65535
_BLOCK_CHUNK = 65532


def _check_grid(batch: int, q_heads: int) -> None:
    if batch > _MAX_GRID_YZ or q_heads > _MAX_GRID_YZ:
        raise ValueError(f"routed_attention: B ({batch}) and Hq ({q_heads}) must be <= {_MAX_GRID_YZ} on the triton "
                         f"backend (CUDA grid limit); split the batch")


def _new_strides(k_new: Optional[torch.Tensor], v_new: Optional[torch.Tensor]):
    if k_new is None:
        return (0, 0, 0, 0), (0, 0, 0, 0)
    return k_new.stride(), v_new.stride()


def routed_attention_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_table: torch.Tensor, block_counts: torch.Tensor,
                             k_new: Optional[torch.Tensor], v_new: Optional[torch.Tensor],
                             softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Inputs are validated by the caller. Returns out [B, Lq, Hq, D] (q's dtype, contiguous)
    and lse [B, Hq, Lq] fp32."""
    batch, q_len, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    new_len = 0 if k_new is None else k_new.shape[1]
    out = torch.empty((batch, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    _check_grid(batch, q_heads)
    block_counts = block_counts.contiguous()  # the kernels read Counts[b] with unit stride
    kn, vn = (k_new, v_new) if new_len > 0 else (k_cache, v_cache)  # placeholders, never read without HAS_NEW
    kn_strides, vn_strides = _new_strides(k_new, v_new)
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), q_heads, batch)  # noqa: E731
    with launch_device(q.device):
        _routed_attention_fwd_kernel[grid](
            out, lse, q, k_cache, v_cache, kn, vn, block_table, block_counts,
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *kn_strides, *vn_strides,
            block_table.stride(0), block_table.stride(1),
            q_len, new_len, block_size, q_heads // kv_heads, softmax_scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16), HAS_NEW=new_len > 0,
            PRECISION=_precision(q.dtype),
        )
    return out, lse


def block_readers(block_table: torch.Tensor, block_counts: torch.Tensor,
                  num_blocks: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse block map in CSR form, built on the device with no host sync.

    Returns ``readers`` int32 [E], ``reader_ptr`` int32 [N + 1] and ``block_order`` int32 [N]: the sequences
    reading block n are ``readers[reader_ptr[n]:reader_ptr[n + 1]]``, in (sequence, table position) order (a
    stable sort of the row-major table), one entry per table entry, so a block listed twice by one sequence
    appears twice. ``block_order`` lists the blocks by decreasing number of readers (the launch order).
    """
    batch, max_blocks = block_table.shape
    device = block_table.device
    valid = torch.arange(max_blocks, device=device)[None, :] < block_counts[:, None].long()
    # Entries past a row's count sort behind every real block id and fall outside every CSR range.
    ids = torch.where(valid, block_table.long(), num_blocks).flatten()
    sorted_ids, order = torch.sort(ids, stable=True)
    readers = torch.div(order, max(max_blocks, 1), rounding_mode="floor").to(torch.int32)
    reader_ptr = torch.searchsorted(sorted_ids, torch.arange(num_blocks + 1, device=device)).to(torch.int32)
    # Launch the most-read blocks first (sink frames are read by every branch): the long programs then overlap with
    # the short ones instead of forming a tail.
    block_order = torch.argsort(reader_ptr[1:] - reader_ptr[:-1], descending=True, stable=True).to(torch.int32)
    return readers, reader_ptr, block_order


def routed_attention_backward(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                              block_counts: torch.Tensor, k_new: Optional[torch.Tensor],
                              v_new: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                              softmax_scale: float, need_dq: bool, need_dcache: bool, need_dnew: bool):
    """Launch the backward kernels that are needed. Returns (dq, dk_cache, dv_cache, dk_new, dv_new), each in
    its input's shape and dtype (contiguous), or None where not asked for (no work is done for it)."""
    if q.numel() == 0:  # no queries: every gradient is zero
        alloc = functools.partial(torch.zeros_like, memory_format=torch.contiguous_format)
    else:  # every element is written by exactly one kernel program below
        alloc = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    dq = alloc(q) if need_dq else None
    dk_cache, dv_cache = (alloc(k_cache), alloc(v_cache)) if need_dcache else (None, None)
    dk_new, dv_new = (alloc(k_new), alloc(v_new)) if need_dnew else (None, None)
    if q.numel() == 0:
        return dq, dk_cache, dv_cache, dk_new, dv_new

    _check_grid(q.shape[0], q.shape[2])
    block_counts = block_counts.contiguous()  # the kernels read Counts[b] with unit stride
    with launch_device(q.device):
        _launch_backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse,
                         softmax_scale, dq, dk_cache, dv_cache, dk_new, dv_new)
    return dq, dk_cache, dv_cache, dk_new, dv_new


def _launch_backward(dout, dlse, q, k_cache, v_cache, block_table, block_counts, k_new, v_new, out, lse,
                     softmax_scale, dq, dk_cache, dv_cache, dk_new, dv_new):
    batch, q_len, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    new_len = 0 if k_new is None else k_new.shape[1]
    group = q_heads // kv_heads
    block_d = max(triton.next_power_of_2(head_dim), 16)
    precision = _precision(q.dtype)
    qk_scale = softmax_scale * LOG2E
    delta = torch.empty_like(lse)
    dlse_strides = dlse.stride() if dlse is not None else (0, 0, 0)
    _delta_kernel[(triton.cdiv(q_len, 64), q_heads, batch)](
        delta, dout, out, dlse if dlse is not None else lse,
        *dout.stride(), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), *dlse_strides,
        q_len, HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_DLSE=dlse is not None, BLOCK_M=64,
    )
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION=precision)
    kn, vn = (k_new, v_new) if new_len > 0 else (k_cache, v_cache)
    kn_strides, vn_strides = _new_strides(k_new, v_new)

    if dq is not None:
        grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), q_heads, batch)  # noqa: E731
        _routed_attention_dq_kernel[grid](
            dq, q, dout, lse, delta, k_cache, v_cache, kn, vn, block_table, block_counts,
            dq.stride(0), dq.stride(1), dq.stride(2),
            *q.stride(), *dout.stride(), lse.stride(0), lse.stride(1),
            *k_cache.stride(), *v_cache.stride(), *kn_strides, *vn_strides,
            block_table.stride(0), block_table.stride(1),
            q_len, new_len, block_size, group, softmax_scale, qk_scale, HAS_NEW=new_len > 0, **common,
        )
    if dk_cache is not None and num_blocks > 0:
        readers, reader_ptr, block_order = block_readers(block_table, block_counts, num_blocks)
        # Grid axis 2 walks block_order, in slices of at most _BLOCK_CHUNK blocks (the CUDA limit on axis 2).
        for first in range(0, num_blocks, _BLOCK_CHUNK):
            order = block_order[first:first + _BLOCK_CHUNK]
            grid = lambda meta, n=order.numel(): (triton.cdiv(block_size, meta["BLOCK_N"]), kv_heads, n)  # noqa
            _routed_attention_dkdv_pool_kernel[grid](
                dk_cache, dv_cache, q, dout, lse, delta, k_cache, v_cache, readers, reader_ptr, order,
                dk_cache.stride(0), dk_cache.stride(1), dk_cache.stride(2),
                *q.stride(), *dout.stride(), lse.stride(0), lse.stride(1),
                *k_cache.stride(), *v_cache.stride(),
                q_len, block_size, group, softmax_scale, qk_scale, **common,
            )
    if dk_new is not None and new_len > 0:
        grid = lambda meta: (triton.cdiv(new_len, meta["BLOCK_N"]), kv_heads, batch)  # noqa: E731
        _routed_attention_dkdv_new_kernel[grid](
            dk_new, dv_new, q, dout, lse, delta, k_new, v_new,
            dk_new.stride(0), dk_new.stride(1), dk_new.stride(2),
            *q.stride(), *dout.stride(), lse.stride(0), lse.stride(1),
            *k_new.stride(), *v_new.stride(),
            q_len, new_len, group, softmax_scale, qk_scale, **common,
        )
