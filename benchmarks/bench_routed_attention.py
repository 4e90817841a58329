"""routed_attention against what users would run instead, forward and forward+backward, in one run.

Workloads (bf16, 12 heads, D 128, 1560-token frames, queries = one 3-frame block of 4,680 tokens per branch, each
branch's own 3-frame chunk passed as k_new / v_new), as in ANCHORS.md:
    G8        8 branches, pool of 18 history frames, each reads 12 of them (random, no repeats) + its chunk
    G16       16 branches, same pool, each reads 9 + its chunk
    LongLive  8 branches, pool of 18: [3 sink | 5 routed of 14 | 1 nearest history frame] + its 3-frame chunk
              (the "4 nearest" frames of LongLive are that history frame plus the chunk: 12 frames, 18,720 keys)
Providers (same inputs, same run, ours first so a cut stage still has them):
    routed                    this library (auto backend: the Triton block-table forward on a GPU); its block-id
                              check and that check's one host sync are included
    routed_tma                the same op with KVPO_TRITON_FORWARD=tma (the TMA forward; sm_90 only, skipped with
                              the reason where it refuses); the backward is the same kernel as ``routed``'s
    gather+sdpa_flash/cudnn   per-branch K/V copies (the gather's time INCLUDED), then PyTorch SDPA
    gather+flash_attn_varlen  the same copies, then flash-attn's varlen kernel (when flash_attn imports)
    magi_ffa                  MagiAttention's flex_flash_attn_func on the flat pool: per branch one (query range,
                              key range) pair per routed block plus one for its chunk; no copy (when it imports)
    flex                      compiled FlexAttention over a flat batch-of-1 layout with a block mask (the mask is
                              built once, outside the timing, its build time recorded); last: its cold compiles
                              are 20-60 s each
Forward+backward differentiates q, k_cache, v_cache, k_new and v_new for every provider, against one grad_out per
workload shared by all. After the warm-up every provider's output (and, forward+backward, every gradient) is
compared with gather+SDPA's: the relative errors go into extra_info (``err_*``) and a case above the tolerance
fails (a fast wrong answer is no speedup).

extra_info: TFLOP/s (4*B*H*Lq*Lk*D forward, 3.5x for forward+backward), ``speedup_vs_<peer>`` (peer time / this
time), ``peak_extra_MB`` (peak allocation of one call above what was allocated before it), ``autotune``
(KVPO_TRITON_AUTOTUNE of the run) and ``autotune_picks`` (the config each autotuned kernel used, ours only).
On CPU only the tiny smoke cases run (ours paired round by round with gather+SDPA), except in gpu_check.sh's dry
run (KVPO_GPU_CHECK_DRY=1), where every case runs on CPU at tiny sizes in fp32 (flex uncompiled) to rehearse the
code paths.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from kvpo_kernels import routed_attention

from benchlib import bench_device, cross_check, dry_run, paired_rounds  # noqa: E402  (benchmarks/ is on sys.path)

FRAME, CHUNK, HEADS, HEAD_DIM, POOL_FRAMES = 1560, 4680, 12, 128, 18
TINY = dict(frame=7, chunk=9, heads=2, head_dim=16)  # the dry run's and the CPU smoke case's geometry
GRAD_NAMES = ("q", "k_cache", "v_cache", "k_new", "v_new")
# Relative Frobenius error vs gather+SDPA: bf16 kernels differ by rounding of P and of the accumulators (~3e-3 on
# these shapes); fp32 (dry run) only by summation order.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}
TMA_MODULE = "kvpo_kernels.triton.routed_attention_tma"


@dataclasses.dataclass
class Workload:
    name: str
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    grad_out: torch.Tensor  # one per workload, shared by every provider
    reference: Optional[Tuple[torch.Tensor, ...]] = None  # gather+SDPA's (out, *grads), filled on first use

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


def make_workload(name: str, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                  frame: int = FRAME, chunk: int = CHUNK, heads: int = HEADS, head_dim: int = HEAD_DIM) -> Workload:
    branches = 16 if name == "G16" else 8
    torch.manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    return Workload(name, randn(branches, chunk, heads, head_dim), randn(POOL_FRAMES, frame, heads, head_dim),
                    randn(POOL_FRAMES, frame, heads, head_dim),
                    torch.tensor(_tables(name, branches), dtype=torch.int32, device=device),
                    randn(branches, chunk, heads, head_dim), randn(branches, chunk, heads, head_dim),
                    randn(branches, chunk, heads, head_dim, grad=False))


# ----------------------------------------------------------------------------------------------------------------
# Providers: workload -> out [B, Lq, H, D]
# ----------------------------------------------------------------------------------------------------------------
def run_routed(w: Workload) -> torch.Tensor:
    return routed_attention(w.q, w.k_cache, w.v_cache, w.block_table, None, w.k_new, w.v_new)


@contextlib.contextmanager
def _env(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def run_routed_tma(w: Workload) -> torch.Tensor:
    with _env("KVPO_TRITON_FORWARD", "tma"):
        return routed_attention(w.q, w.k_cache, w.v_cache, w.block_table, None, w.k_new, w.v_new, backend="triton")


def tma_missing(device: torch.device) -> Optional[str]:
    """Why the TMA forward cannot run here (None if it may)."""
    if importlib.util.find_spec(TMA_MODULE) is None:
        return f"{TMA_MODULE} is not in this checkout"
    if device.type != "cuda":
        return "the TMA forward needs an sm_90 CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"the TMA forward needs sm_90, this device is sm_{major}{minor}"
    return None


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
def _flex_attention():
    """Compiled FlexAttention (what its users run); uncompiled in the dry run, where only the mask logic matters."""
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention if dry_run() else torch.compile(flex_attention, dynamic=False)


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


def _flat_pool_and_chunks(w: Workload):
    """[N*S + B*Ln, H, D] keys and values: the pool, then every branch's chunk (the layout flex and magi read)."""
    k = torch.cat([w.k_cache.flatten(0, 1), w.k_new.flatten(0, 1)])
    v = torch.cat([w.v_cache.flatten(0, 1), w.v_new.flatten(0, 1)])
    return k, v


def run_flex(w: Workload) -> torch.Tensor:
    branches, q_len, heads, head_dim = w.q.shape
    q = w.q.reshape(1, branches * q_len, heads, head_dim).transpose(1, 2)
    k, v = (t.unsqueeze(0).transpose(1, 2) for t in _flat_pool_and_chunks(w))
    if not torch.is_grad_enabled():  # FlexAttention on CPU refuses inputs that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    out = _flex_attention()(q, k, v, block_mask=flex_block_mask(w)[0])
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


def magi_ranges(w: Workload) -> Tuple[torch.Tensor, torch.Tensor]:
    """int32 [R, 2] query ranges and key ranges (half-open) over the flat layouts: branch b's queries
    [b*Lq, (b+1)*Lq) against each routed block's keys [id*S, (id+1)*S) and against its own chunk."""
    branches, q_len = w.q.shape[:2]
    num_blocks, frame = w.k_cache.shape[:2]
    chunk = w.k_new.shape[1]
    q_ranges, k_ranges = [], []
    for b, row in enumerate(w.block_table.tolist()):
        spans = [(block * frame, (block + 1) * frame) for block in row]
        spans.append((num_blocks * frame + b * chunk, num_blocks * frame + (b + 1) * chunk))
        for span in spans:
            q_ranges.append((b * q_len, (b + 1) * q_len))
            k_ranges.append(span)
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=w.q.device)
    return as_tensor(q_ranges), as_tensor(k_ranges)


@functools.lru_cache(maxsize=None)
def _magi_function():
    for module in ("magi_attention.api", "magi_attention.functional"):
        try:
            return importlib.import_module(module).flex_flash_attn_func
        except (ImportError, AttributeError):
            continue
    raise ImportError("magi_attention.api.flex_flash_attn_func")


_MAGI_RANGES: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def run_magi_ffa(w: Workload) -> torch.Tensor:
    ffa = _magi_function()
    if w.name not in _MAGI_RANGES:  # built once, outside the timing (like flex's block mask)
        _MAGI_RANGES[w.name] = magi_ranges(w)
    q_ranges, k_ranges = _MAGI_RANGES[w.name]
    branches, q_len, heads, head_dim = w.q.shape
    k, v = _flat_pool_and_chunks(w)
    kwargs = {}
    if "max_seqlen_q" in inspect.signature(ffa).parameters:  # older releases need the longest ranges
        kwargs = dict(max_seqlen_q=q_len, max_seqlen_k=max(w.k_cache.shape[1], w.k_new.shape[1]))
    out = ffa(w.q.flatten(0, 1), k, v, q_ranges, k_ranges, **kwargs)[0]
    return out.view(branches, q_len, heads, head_dim)


def _import_missing(module: str) -> Callable[[torch.device], Optional[str]]:
    def why(device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return f"{module} needs a CUDA device"
        try:
            importlib.import_module(module)
        except ImportError as err:
            return f"{module} is not installed ({err})"
        return None
    return why


PROVIDERS: Dict[str, Callable[[Workload], torch.Tensor]] = {
    "routed": run_routed,
    "routed_tma": run_routed_tma,
    "gather+sdpa_flash": run_sdpa_flash,
    "gather+sdpa_cudnn": run_sdpa_cudnn,
    "gather+flash_attn_varlen": run_flash_attn_varlen,
    "magi_ffa": run_magi_ffa,
    "flex": run_flex,
}
OURS = ("routed", "routed_tma")
# Why a provider cannot run on this machine (checked before any work; None = try it).
MISSING: Dict[str, Callable[[torch.device], Optional[str]]] = {
    "routed_tma": tma_missing,
    "gather+flash_attn_varlen": _import_missing("flash_attn"),
    "magi_ffa": _import_missing("magi_attention"),
}
WORKLOADS = ("G8", "LongLive", "G16")
DIRECTIONS = ("fwd", "fwd+bwd")
# Ours on every workload first, then the peers that need no compilation, then FlexAttention: torch.compile builds
# its forward and backward per shape and per mask closure (20-60 s each on a cold cache), so it runs where the
# stage's remaining time allows (G8, then LongLive), and the stage's timeout cuts it, not ours.
CASES = [(wl, d, p) for p in OURS for wl in WORKLOADS for d in DIRECTIONS]
CASES += [(wl, d, p) for wl in WORKLOADS for d in DIRECTIONS for p in PROVIDERS if p not in OURS and p != "flex"]
CASES += [(wl, d, "flex") for wl in ("G8", "LongLive") for d in DIRECTIONS]


def step_fn(provider: Callable[[Workload], torch.Tensor], w: Workload, direction: str):
    """A call of one provider: fwd returns (out,); fwd+bwd returns (out, dq, dk_cache, dv_cache, dk_new, dv_new)."""
    if direction == "fwd":
        def forward():
            with torch.no_grad():
                return (provider(w),)
        return forward

    def forward_backward():
        out = provider(w)
        return (out.detach(), *torch.autograd.grad(out, w.leaves(), w.grad_out))
    return forward_backward


def reference_outputs(w: Workload) -> Tuple[torch.Tensor, ...]:
    """gather+SDPA (flash backend) out and gradients for the shared grad_out, computed once per workload."""
    if w.reference is None:
        w.reference = step_fn(run_sdpa_flash, w, "fwd+bwd")()
    return w.reference


def check_against_reference(w: Workload, direction: str, outputs: Tuple[torch.Tensor, ...]) -> Dict[str, float]:
    names = ("out",) + (GRAD_NAMES if direction == "fwd+bwd" else ())
    want = reference_outputs(w)[:len(names)]
    return cross_check(outputs, want, names, TOLERANCE[w.q.dtype])


def autotune_picks() -> Dict[str, str]:
    """The config each of our autotuned Triton kernels last ran with (``best_config``), by kernel name."""
    from triton.runtime.autotuner import Autotuner

    picks = {}
    for name in ("kvpo_kernels.triton.routed_attention", TMA_MODULE):
        module = sys.modules.get(name)
        for attr, obj in vars(module).items() if module is not None else ():
            if isinstance(obj, Autotuner) and getattr(obj, "best_config", None) is not None:
                picks[attr] = str(obj.best_config)
    return picks


def _tma_autotuners() -> list:
    from triton.runtime.autotuner import Autotuner

    module = sys.modules.get(TMA_MODULE)
    return [obj for obj in vars(module).values() if isinstance(obj, Autotuner)] if module is not None else []


def reset_tma_picks() -> None:
    """Forget the TMA kernels' last configs, so ``tma_ran`` shows whether the next call really took the TMA path."""
    for kernel in _tma_autotuners():
        kernel.best_config = None


def tma_ran() -> bool:
    return any(getattr(kernel, "best_config", None) is not None for kernel in _tma_autotuners())


def peak_extra_mb(fn) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


_WORKLOADS: Dict[str, Workload] = {}


def get_workload(name: str) -> Workload:
    """The full-size bf16 workload on a GPU; the tiny fp32 one on CPU in the dry run. Kept for the session (all
    three together are ~6 GB on a GPU), so the ours-first case order builds each once."""
    if name not in _WORKLOADS:
        device = bench_device()
        _WORKLOADS[name] = (make_workload(name, device) if device.type == "cuda"
                            else make_workload(name, device, torch.float32, **TINY))
    return _WORKLOADS[name]


def warm_up(provider: str, fn) -> Tuple[torch.Tensor, ...]:
    """Compile / autotune outside the timing; a peer that cannot run skips with its reason, ours fail."""
    if provider == "routed_tma":
        reset_tma_picks()
    try:
        outputs = fn()
    except (RuntimeError, ValueError, NotImplementedError) as err:
        if provider == "routed":
            raise
        pytest.skip(f"{provider} cannot run this workload: {str(err).splitlines()[0]}")
    if provider == "routed_tma" and not tma_ran():
        pytest.fail("KVPO_TRITON_FORWARD=tma did not reach a TMA kernel (the env var is read elsewhere?)")
    return outputs


@pytest.mark.gpu
@pytest.mark.parametrize("workload,direction,provider", CASES, ids=["-".join(case) for case in CASES])
def test_routed_attention_gpu(benchmark, record, cuda_synchronize, workload, direction, provider):
    w = get_workload(workload)
    why = MISSING.get(provider, lambda device: None)(w.q.device)
    if why is not None:
        pytest.skip(why)
    fn = step_fn(PROVIDERS[provider], w, direction)
    outputs = warm_up(provider, fn)
    extra = check_against_reference(w, direction, outputs)
    del outputs
    extra.update(keys_per_branch=w.keys_per_branch, autotune=os.environ.get("KVPO_TRITON_AUTOTUNE", "1"))
    extra["peak_extra_MB"] = peak_extra_mb(fn)
    if provider in OURS and w.q.is_cuda:
        extra["autotune_picks"] = autotune_picks()
        print(f"\n[autotune] {workload} {direction} {provider}: {extra['autotune_picks']}", file=sys.__stderr__)
    if provider == "flex":
        extra["create_block_mask_ms"] = flex_block_mask(w)[1]
    benchmark.group = f"routed_attention {workload} {direction}"
    # Fixed rounds: each call is 5-100 ms on a GPU and the whole file has about a minute in gpu_check.sh.
    benchmark.pedantic(cuda_synchronize(fn, w.q.device), rounds=5, warmup_rounds=0)
    flops = w.fwd_flops() * (1.0 if direction == "fwd" else 3.5)
    record(benchmark, flops=flops, peer_group=f"{workload}-{direction}", provider=provider, device=w.q.device,
           **extra)


@pytest.mark.parametrize("provider", ["routed", "gather+sdpa_flash"])
def test_routed_attention_cpu_smoke(benchmark, record, pinned_threads, provider):
    """Tiny shapes on CPU (auto backend), ours and gather+SDPA, so the file runs and cross-checks everywhere."""
    w = make_workload("G8", device="cpu", dtype=torch.float32, **TINY)
    fn = step_fn(PROVIDERS[provider], w, "fwd+bwd")
    extra = check_against_reference(w, "fwd+bwd", fn())
    benchmark.group = "routed_attention cpu smoke fwd+bwd fp32 (tiny)"
    if provider == "routed":  # gather+SDPA runs right before each of our rounds: per-round ratios, their spread
        extra.update(paired_rounds(benchmark, fn, {"gather+sdpa_flash": step_fn(run_sdpa_flash, w, "fwd+bwd")},
                                   rounds=30, warmup=2))
    else:
        benchmark.pedantic(fn, rounds=30, warmup_rounds=2)
    record(benchmark, flops=w.fwd_flops() * 3.5, peer_group="cpu-smoke", provider=provider, device="cpu", **extra)
