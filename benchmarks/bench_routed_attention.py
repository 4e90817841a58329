"""routed_attention against what users would run instead, forward and forward+backward, in one run.

Workloads (bf16, 12 heads, D 128, 1560-token frames, queries = one 3-frame block of 4,680 tokens per branch, each
branch's own 3-frame chunk passed as k_new / v_new), as in ANCHORS.md:
    G8        8 branches, pool of 18 history frames, each reads 12 of them (random, no repeats) + its chunk
    G16       16 branches, same pool, each reads 9 + its chunk
    LongLive  8 branches, pool of 18: [3 sink | 5 routed of 14 | 1 nearest history frame] + its 3-frame chunk
              (the "4 nearest" frames of LongLive are that history frame plus the chunk: 12 frames, 18,720 keys)
Providers (same inputs, same run): ``routed`` (this library; block ids checked, its one host sync included),
``gather+sdpa_flash`` and ``gather+sdpa_cudnn`` (per-branch K/V copies, gather time included, then PyTorch SDPA
with that backend), ``flex`` (compiled FlexAttention over a flat batch-of-1 layout with a block mask; the mask is
built once, outside the timing, its build time recorded), ``gather+flash_attn_varlen`` when flash-attn imports.
Forward+backward differentiates q, k_cache, v_cache, k_new and v_new for every provider.

extra_info: TFLOP/s (4*B*H*Lq*Lk*D forward, 3.5x for forward+backward), ``speedup_vs_<peer>`` (peer time / this
time), ``peak_extra_MB`` (peak allocation of one call above what was allocated before it), device name.
On CPU only one tiny smoke case runs.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

from kvpo_kernels import routed_attention

FRAME, CHUNK, HEADS, HEAD_DIM, POOL_FRAMES = 1560, 4680, 12, 128, 18


@dataclasses.dataclass
class Workload:
    name: str
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor

    @property
    def keys_per_branch(self) -> int:
        return self.block_table.shape[1] * self.k_cache.shape[1] + self.k_new.shape[1]

    def fwd_flops(self) -> float:
        batch, q_len, heads, head_dim = self.q.shape
        return 4.0 * batch * heads * q_len * self.keys_per_branch * head_dim

    def leaves(self) -> List[torch.Tensor]:
        return [self.q, self.k_cache, self.v_cache, self.k_new, self.v_new]


def _tables(name: str, branches: int) -> List[List[int]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(branches):
        if name == "LongLive":
            routed = (3 + torch.randperm(14, generator=generator)[:5]).sort().values.tolist()
            rows.append([0, 1, 2] + routed + [POOL_FRAMES - 1])
        else:
            reads = 12 if name == "G8" else 9
            rows.append(torch.randperm(POOL_FRAMES, generator=generator)[:reads].sort().values.tolist())
    return rows


def make_workload(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, frame: int = FRAME,
                  chunk: int = CHUNK, heads: int = HEADS, head_dim: int = HEAD_DIM) -> Workload:
    branches = 16 if name == "G16" else 8
    torch.manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(True)

    return Workload(name, randn(branches, chunk, heads, head_dim), randn(POOL_FRAMES, frame, heads, head_dim),
                    randn(POOL_FRAMES, frame, heads, head_dim),
                    torch.tensor(_tables(name, branches), dtype=torch.int32, device=device),
                    randn(branches, chunk, heads, head_dim), randn(branches, chunk, heads, head_dim))


# ----------------------------------------------------------------------------------------------------------------
# Providers: workload -> out [B, Lq, H, D]
# ----------------------------------------------------------------------------------------------------------------
def run_routed(w: Workload) -> torch.Tensor:
    return routed_attention(w.q, w.k_cache, w.v_cache, w.block_table, None, w.k_new, w.v_new)


def gather(w: Workload):
    """What the public KVPO code does: per-branch copies of the routed frames, then the branch's chunk."""
    ids = w.block_table.long()
    k = torch.cat([w.k_cache[ids].flatten(1, 2), w.k_new], dim=1)  # [B, Lk, H, D]
    v = torch.cat([w.v_cache[ids].flatten(1, 2), w.v_new], dim=1)
    return k, v


def _sdpa(w: Workload, backend) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    k, v = gather(w)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(w.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def run_sdpa_flash(w: Workload) -> torch.Tensor:
    from torch.nn.attention import SDPBackend
    return _sdpa(w, SDPBackend.FLASH_ATTENTION)


def run_sdpa_cudnn(w: Workload) -> torch.Tensor:
    from torch.nn.attention import SDPBackend
    return _sdpa(w, SDPBackend.CUDNN_ATTENTION)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


_BLOCK_MASKS: Dict[str, tuple] = {}


def flex_block_mask(w: Workload):
    """Flat layout: queries of all branches in one row; keys = the whole pool, then every branch's chunk."""
    if w.name not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        branches, q_len = w.q.shape[:2]
        num_blocks, frame = w.k_cache.shape[:2]
        chunk = w.k_new.shape[1]
        pool_len = num_blocks * frame
        member = torch.zeros(branches, num_blocks, dtype=torch.bool, device=w.q.device)
        member.scatter_(1, w.block_table.long(), True)

        def mask_mod(b, h, q_idx, kv_idx):
            branch = q_idx // q_len
            frame_id = torch.clamp(kv_idx // frame, max=num_blocks - 1)
            own_chunk = (kv_idx - pool_len) // chunk == branch
            return torch.where(kv_idx < pool_len, member[branch, frame_id], own_chunk)

        start = time.perf_counter()
        mask = create_block_mask(mask_mod, 1, None, branches * q_len, pool_len + branches * chunk,
                                 device=w.q.device)
        if w.q.is_cuda:
            torch.cuda.synchronize()
        _BLOCK_MASKS[w.name] = (mask, (time.perf_counter() - start) * 1e3)
    return _BLOCK_MASKS[w.name]


def run_flex(w: Workload) -> torch.Tensor:
    branches, q_len, heads, head_dim = w.q.shape
    q = w.q.reshape(1, branches * q_len, heads, head_dim).transpose(1, 2)
    k = torch.cat([w.k_cache.flatten(0, 1), w.k_new.flatten(0, 1)]).unsqueeze(0).transpose(1, 2)
    v = torch.cat([w.v_cache.flatten(0, 1), w.v_new.flatten(0, 1)]).unsqueeze(0).transpose(1, 2)
    out = _compiled_flex()(q, k, v, block_mask=flex_block_mask(w)[0])
    return out.transpose(1, 2).reshape(branches, q_len, heads, head_dim)


def run_flash_attn_varlen(w: Workload) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    branches, q_len, heads, head_dim = w.q.shape
    k, v = gather(w)
    keys = k.shape[1]
    cu_q = torch.arange(0, branches + 1, device=w.q.device, dtype=torch.int32) * q_len
    cu_k = torch.arange(0, branches + 1, device=w.q.device, dtype=torch.int32) * keys
    out = flash_attn_varlen_func(w.q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, q_len, keys)
    return out.view(branches, q_len, heads, head_dim)


def _flash_attn_missing():
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        return f"flash-attn is not installed ({err})"
    return None


PROVIDERS: Dict[str, Callable[[Workload], torch.Tensor]] = {
    "routed": run_routed,
    "gather+sdpa_flash": run_sdpa_flash,
    "gather+sdpa_cudnn": run_sdpa_cudnn,
    "flex": run_flex,
    "gather+flash_attn_varlen": run_flash_attn_varlen,
}
# Every workload and direction for the providers that need no compilation besides ours first; FlexAttention last
# and on G8 only: torch.compile builds its forward and backward kernels per shape and per mask closure (20-60 s on
# a cold cache), and the whole file has a 90 s budget in gpu_check.sh (ANCHORS.md holds its G16 numbers).
CASES = [(workload, direction, provider) for workload in ("G8", "LongLive", "G16") for direction in ("fwd", "fwd+bwd")
         for provider in PROVIDERS if provider != "flex"]
CASES += [("G8", direction, "flex") for direction in ("fwd", "fwd+bwd")]


def step_fn(provider: Callable[[Workload], torch.Tensor], w: Workload, direction: str):
    if direction == "fwd":
        def forward():
            with torch.no_grad():
                return provider(w)
        return forward
    grad_out = torch.randn_like(w.q)

    def forward_backward():
        return torch.autograd.grad(provider(w), w.leaves(), grad_out)
    return forward_backward


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


_WORKLOADS: Dict[str, Workload] = {}


@pytest.mark.gpu
@pytest.mark.parametrize("workload,direction,provider", CASES, ids=["-".join(case) for case in CASES])
def test_routed_attention_gpu(benchmark, record, cuda_synchronize, workload, direction, provider):
    if provider == "gather+flash_attn_varlen" and _flash_attn_missing():
        pytest.skip(_flash_attn_missing())
    if workload not in _WORKLOADS:
        _WORKLOADS.clear()  # one workload's tensors at a time
        _WORKLOADS[workload] = make_workload(workload)
    w = _WORKLOADS[workload]
    fn = step_fn(PROVIDERS[provider], w, direction)
    try:
        fn()  # compile / autotune outside the timing; an unsupported peer skips with its reason
    except RuntimeError as err:
        if provider == "routed":
            raise
        pytest.skip(f"{provider} cannot run this workload: {str(err).splitlines()[0]}")
    extra = {"peak_extra_MB": peak_extra_mb(fn), "keys_per_branch": w.keys_per_branch}
    if provider == "flex":
        extra["create_block_mask_ms"] = flex_block_mask(w)[1]
    benchmark.group = f"routed_attention {workload} {direction}"
    # Few rounds: each call is 5-100 ms and the whole file must stay within about two minutes on the GPU.
    benchmark.pedantic(cuda_synchronize(fn, w.q.device), rounds=5, warmup_rounds=1)
    flops = w.fwd_flops() * (1.0 if direction == "fwd" else 3.5)
    record(benchmark, flops=flops, peer_group=f"{workload}-{direction}", provider=provider, device=w.q.device,
           **extra)


def test_routed_attention_cpu_smoke(benchmark, record):
    """Tiny shapes on CPU (auto backend): the benchmark file runs everywhere."""
    w = make_workload("G8", device="cpu", dtype=torch.float32, frame=7, chunk=9, heads=2, head_dim=16)
    fn = step_fn(run_routed, w, "fwd+bwd")
    benchmark(fn)
    record(benchmark, flops=w.fwd_flops() * 3.5, provider="routed", device="cpu")
