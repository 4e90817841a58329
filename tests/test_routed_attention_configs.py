"""Every config the autotuner may pick for routed_attention's Triton kernels gives the right answer.

gpu_check.sh runs the GPU tests with KVPO_TRITON_AUTOTUNE=0 (the first fitting config, untimed) while the
benchmark autotunes over the first _MAX_TIMED configs of each list, so a config that only the autotuner picks would
otherwise reach users untested. Each case here replaces one autotuned kernel's config list by one of its configs (the other kernels keep
theirs) and checks the output, lse and all five gradients against the float64 reference, in bf16 on a GPU.
Without CUDA (TRITON_INTERPRET=1) every kernel has its single interpreter config: one case runs it in fp32 on tiny
shapes, with the same forcing code. The TMA forward's kernels (when its module exists) run with
KVPO_TRITON_FORWARD=tma.
"""
import importlib
import importlib.util

import pytest
import torch

from kvpo_kernels import reference, routed_attention
from _assertions import assert_close_to_truth

from triton.runtime.autotuner import Autotuner

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MODULES = {"kvpo_kernels.triton.routed_attention": "blocktable", "kvpo_kernels.triton.routed_attention_tma": "tma"}


def _autotuned_kernels():
    """(module name, kernel name, Autotuner) for every autotuned kernel of the modules present."""
    found = []
    for name in MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        found += [(name, attr, obj) for attr, obj in vars(module).items() if isinstance(obj, Autotuner)]
    return found


def _cases():
    kernels = _autotuned_kernels()
    if not CUDA:  # interpreter: one config shared by every kernel; forcing the first kernel's runs it everywhere
        return [pytest.param(kernels[0][0], kernels[0][1], 0, id="interpreter-config")] if kernels else []
    return [pytest.param(module, attr, index, id=f"{attr}-{index}-{config}", marks=pytest.mark.gpu)
            for module, attr, kernel in kernels for index, config in enumerate(kernel.configs[:_pickable(module)])]


def _pickable(module_name):
    """How many leading configs the autotuner may time, hence pick (``_MAX_TIMED`` where the module caps it: the
    later ones are never chosen at the benchmark's head dim, where the first ones fit in shared memory)."""
    return getattr(importlib.import_module(module_name), "_MAX_TIMED", None)


def _inputs(dtype):
    """GQA (4 query heads over 2 kv heads), blocks of 37 tokens (masked tail tiles), uneven block counts; D 128 on a
    GPU (the benchmark's head dim, where shared memory and registers are tightest), 32 in the interpreter."""
    torch.manual_seed(0)
    d = 128 if CUDA else 32
    shape_q, shape_pool, shape_new = (2, 70, 4, d), (5, 37, 2, d), (2, 19, 2, d)
    q = torch.randn(shape_q, dtype=dtype, device=DEVICE)
    k_cache, v_cache = (torch.randn(shape_pool, dtype=dtype, device=DEVICE) for _ in range(2))
    k_new, v_new = (torch.randn(shape_new, dtype=dtype, device=DEVICE) for _ in range(2))
    table = torch.tensor([[4, 0, 2], [1, 3, 0]], dtype=torch.int32, device=DEVICE)
    counts = torch.tensor([3, 2], dtype=torch.int32, device=DEVICE)
    return [q, k_cache, v_cache, k_new, v_new], table, counts


def _forward_backward(fn, leaves, table, counts, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    q, k_cache, v_cache, k_new, v_new = leaves
    out, lse = fn(q, k_cache, v_cache, table, counts, k_new, v_new, return_lse=True)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, lse, grads


@pytest.mark.parametrize("module_name,kernel_name,index", _cases())
def test_forced_config_matches_reference(monkeypatch, module_name, kernel_name, index):
    kernel = getattr(importlib.import_module(module_name), kernel_name)
    forced = kernel.configs[index]
    monkeypatch.setattr(kernel, "configs", [forced])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setenv("KVPO_TRITON_FORWARD", MODULES[module_name])
    dtype = torch.bfloat16 if CUDA else torch.float32
    leaves, table, counts = _inputs(dtype)
    grad_out = torch.randn_like(leaves[0])

    def ours(*args, **kwargs):
        return routed_attention(*args, backend="triton", **kwargs)

    out, lse, grads = _forward_backward(ours, leaves, table, counts, grad_out)
    assert kernel.best_config is forced, f"{kernel_name} did not run with the forced config"
    truth_out, truth_lse, truth_grads = _forward_backward(reference.routed_attention, [t.double() for t in leaves],
                                                          table, counts, grad_out.double())
    baseline = _forward_backward(reference.routed_attention, leaves, table, counts, grad_out) if CUDA else None
    assert_close_to_truth("out", out, truth_out, baseline[0] if baseline else None)
    assert_close_to_truth("lse", lse, truth_lse, baseline[1] if baseline else None)
    for position, name in enumerate(("q", "k_cache", "v_cache", "k_new", "v_new")):
        assert_close_to_truth(f"d{name}", grads[position], truth_grads[position],
                              baseline[2][position] if baseline else None)
