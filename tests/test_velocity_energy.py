"""velocity_energy against the float64 reference: forward, dpred, dtarget (and dweight), every backend that runs here.

CPU (CI): ``torch``, ``cpu`` (C++), ``triton`` under ``TRITON_INTERPRET=1``. GPU (``-m gpu``): ``triton`` and ``cuda``,
bf16 included; the small ones are also marked ``sanitizer`` for the compute-sanitizer pass of gpu_check.sh.
Every kernel output is allocated NaN-filled (``poisoned``), so an element a kernel forgets to write fails the test.
"""
from __future__ import annotations

import math

import pytest
import torch

import kvpo_kernels
from kvpo_kernels import reference
from kvpo_kernels._backends import backend_table, backends_for, machine_unavailable, why_not
from kvpo_kernels.ops.velocity_energy import _velocity_energy_backward_op, _velocity_energy_op

from _assertions import assert_close_to_truth
from _sm90 import run_compile_script

LOW_PRECISION = (torch.float16, torch.bfloat16)
HAS_CUDA = torch.cuda.is_available()


CPU = torch.device("cpu")
# Backends that run CPU tensors here, from the op's backend table (torch; cpu with the C++ extension; triton under
# TRITON_INTERPRET=1), each tested in every dtype the table says it serves.
CPU_BACKENDS = backends_for("velocity_energy", CPU, torch.float32)


@pytest.fixture
def poisoned(monkeypatch):
    """A context in which every ``torch.empty`` the launchers call returns NaN-filled memory."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    class Poison:
        def __enter__(self):
            monkeypatch.setattr(torch, "empty", nan_empty)

        def __exit__(self, *exc):
            monkeypatch.setattr(torch, "empty", real_empty)

    return Poison()


def _randn(shape, dtype, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def _weight(kind, batch, steps, device="cpu"):
    """Random positive weights shaped [T] or [B, T], or None."""
    if kind is None:
        return None
    shape = (steps,) if kind == "T" else (batch, steps)
    return torch.rand(shape, device=device) + 0.5


def _energy_and_grads(fn, pred, target, weight, grad):
    """E and the gradients of <E, grad> w.r.t. pred, target (and weight), through ``fn``."""
    inputs = [t for t in (pred, target, weight) if t is not None]
    energy = fn(*inputs)
    grads = torch.autograd.grad(energy, inputs, grad.to(energy.dtype))
    return [energy.detach(), *grads]


def check_against_reference(backend, pred, target, weight=None, reduction="mean", poison=None):
    """Compare E, dpred, dtarget, dweight of ``backend`` with the float64 reference (flash-attention's rule for
    low precision: at most 2x the error of the same-dtype reference + 1e-5; fp32 within 1e-4 relative).

    pred/target may be views (any strides); they and weight are made to require grad here.
    """
    batch, steps = pred.shape[:2]
    grad = torch.randn(batch, steps, device=pred.device)

    def as_input(x):  # a leaf with the caller's strides and storage offset (detach keeps the view's layout)
        return None if x is None else x.detach().requires_grad_()

    p64 = pred.detach().double().requires_grad_()
    t64 = target.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_() if weight is not None else None
    truth = _energy_and_grads(lambda p, t, *w: reference.velocity_energy(p, t, w[0] if w else None, reduction),
                              p64, t64, w64, grad)
    baseline = None
    if pred.dtype in LOW_PRECISION:
        pb = pred.detach().clone().requires_grad_()
        tb = target.detach().clone().requires_grad_()
        wb = weight.detach().clone().requires_grad_() if weight is not None else None
        baseline = _energy_and_grads(lambda p, t, *w: reference.velocity_energy(p, t, w[0] if w else None, reduction),
                                     pb, tb, wb, grad)

    pa, ta, wa = as_input(pred), as_input(target), as_input(weight)

    def run(p, t, *w):
        return kvpo_kernels.velocity_energy(p, t, w[0] if w else None, reduction=reduction, backend=backend)

    if poison is not None:
        with poison:
            actual = _energy_and_grads(run, pa, ta, wa, grad)
    else:
        actual = _energy_and_grads(run, pa, ta, wa, grad)

    assert actual[0].shape == (batch, steps)
    assert actual[0].dtype == (torch.float64 if pred.dtype == torch.float64 else torch.float32)
    label = (f"{backend} {pred.dtype} {tuple(pred.shape)} weight={None if weight is None else tuple(weight.shape)} "
             f"{reduction}")
    for i, (name, got, want) in enumerate(zip(["E", "dpred", "dtarget", "dweight"], actual, truth)):
        if name in ("dpred", "dtarget"):
            assert got.dtype == pred.dtype and got.shape == pred.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
        base = baseline[i] if baseline is not None and name in ("dpred", "dtarget") else None
        assert_close_to_truth(f"{label}: {name}", got, want, base)
    return actual


# Odd sizes: one element per row, a prime-ish 1559, a 4-D trailing shape, a full 299,520-element chunk, rank 2.
CASES = [
    pytest.param((2, 3, 1), None, "mean", id="n1"),
    pytest.param((2, 3, 1559), "T", "sum", id="n1559-wT-sum"),
    pytest.param((2, 3, 37, 41), "BT", "mean", id="n37x41-wBT"),
    pytest.param((3, 5), "T", "mean", id="rank2-wT"),
    pytest.param((2, 2, 299_520), "BT", "sum", id="n299520-wBT-sum"),
]


@pytest.mark.parametrize("shape,weight_kind,reduction", CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(backend, dtype, shape, weight_kind, reduction, poisoned):
    if why_not("velocity_energy", backend, CPU, dtype) is not None:
        pytest.skip(why_not("velocity_energy", backend, CPU, dtype))
    if backend == "triton" and shape[-1] == 299_520 and dtype != torch.float32:
        pytest.skip("the interpreter is slow: the 299,520 case runs once (fp32)")
    pred, target = _randn(shape, dtype), _randn(shape, dtype)
    check_against_reference(backend, pred, target, _weight(weight_kind, *shape[:2]), reduction, poisoned)


@pytest.mark.parametrize("weight_kind", [None, "T", "BT"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weights_and_reductions(backend, weight_kind, reduction, poisoned):
    shape = (3, 4, 129)
    pred, target = _randn(shape, torch.float32), _randn(shape, torch.float32)
    check_against_reference(backend, pred, target, _weight(weight_kind, 3, 4), reduction, poisoned)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_weight(backend):
    """A bf16 weight with fp32 inputs is read as fp32; its gradient comes back in bf16."""
    pred, target = torch.randn(2, 3, 77), torch.randn(2, 3, 77)
    weight = (torch.rand(3) + 0.5).to(torch.bfloat16).requires_grad_()
    energy = kvpo_kernels.velocity_energy(pred, target, weight, backend=backend)
    (grad_weight,) = torch.autograd.grad(energy.sum(), weight)
    w64 = weight.detach().double().requires_grad_()
    truth = reference.velocity_energy(pred.double(), target.double(), w64)
    (truth_grad,) = torch.autograd.grad(truth.sum(), w64)
    assert grad_weight.dtype == torch.bfloat16
    assert_close_to_truth("E", energy, truth)
    assert_close_to_truth("dweight", grad_weight, truth_grad, truth_grad.to(torch.bfloat16))


def _non_contiguous_layouts(dtype, device="cpu"):
    """(name, pred, target): views with strided B/T, non-contiguous trailing dims, odd storage offsets."""
    B, T = 3, 4
    yield "transposed-trailing", _randn((B, T, 23, 17), dtype, device).transpose(2, 3), \
        _randn((B, T, 17, 23), dtype, device)
    yield "sliced-T", _randn((B, 2 * T, 391), dtype, device)[:, ::2], _randn((B, T, 391), dtype, device)
    yield "permuted-BT", _randn((T, B, 391), dtype, device).transpose(0, 1), \
        _randn((B, T + 1, 391), dtype, device)[:, 1:]
    yield "offset-1", _randn((B * T * 391 + 1,), dtype, device)[1:].view(B, T, 391), \
        _randn((B * T * 391 + 3,), dtype, device)[3:].view(B, T, 391)
    yield "sliced-trailing", _randn((B, T, 40, 33), dtype, device)[..., 1:32], _randn((B, T, 40, 31), dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous(backend, dtype, poisoned):
    for name, pred, target in _non_contiguous_layouts(dtype):
        assert not pred.is_contiguous() or name == "offset-1"
        weight = torch.rand(4) + 0.5
        check_against_reference(backend, pred, target, weight.expand(3, 4), "mean", poisoned)


def test_non_contiguous_rows_are_not_copied():
    """Strided B/T with contiguous trailing dims is read in place; only non-contiguous trailing dims are copied."""
    from kvpo_kernels.ops.velocity_energy import _rows
    sliced = torch.randn(3, 8, 100)[:, ::2]
    assert _rows(sliced).data_ptr() == sliced.data_ptr()
    transposed = torch.randn(3, 4, 10, 12).transpose(2, 3)
    assert _rows(transposed).is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    """gradcheck in float64 for pred, target and a [T] weight (every CPU backend supports float64).

    Triton's interpreter costs ~30 ms a launch, so it gets gradcheck's fast mode (random projections of the
    Jacobian) instead of one launch per input element."""
    pred = torch.randn(2, 3, 4, 5, dtype=torch.float64).transpose(2, 3).requires_grad_()
    target = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda p, t, w: kvpo_kernels.velocity_energy(p, t, w, reduction=reduction, backend=backend),
            (pred, target, weight), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic(backend, dtype):
    """The same inputs give bitwise the same E and gradients (no atomics; fixed partition and order)."""
    pred = _randn((2, 2, 299_520 if backend != "triton" else 70_001), dtype).requires_grad_()
    target = _randn(pred.shape, dtype).requires_grad_()
    weight = torch.rand(2)
    grad = torch.randn(2, 2)
    runs = []
    for _ in range(2):
        energy = kvpo_kernels.velocity_energy(pred, target, weight, reduction="sum", backend=backend)
        runs.append([energy, *torch.autograd.grad(energy, (pred, target), grad)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.skipif(machine_unavailable("cpu") is not None, reason="C++ extension not built")
def test_cpu_independent_of_thread_count():
    pred, target = torch.randn(2, 3, 100_003), torch.randn(2, 3, 100_003)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kvpo_kernels.velocity_energy(pred, target, reduction="sum", backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = kvpo_kernels.velocity_energy(pred, target, reduction="sum", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_empty_batch():
    pred = torch.randn(0, 3, 5)
    assert kvpo_kernels.velocity_energy(pred, pred.clone()).shape == (0, 3)


# ---------------------------------------------------------------------------------------------- bad inputs

def _bad_inputs():
    p = torch.randn(2, 3, 4)
    yield "rank", dict(pred=torch.randn(5), target=torch.randn(5)), ValueError, "pred"
    yield "shape", dict(pred=p, target=torch.randn(2, 3, 5)), ValueError, "target"
    yield "dtype", dict(pred=p, target=p.half()), TypeError, "target"
    ints = torch.ones(2, 3, 4, dtype=torch.int32)
    yield "int pred", dict(pred=ints, target=ints), TypeError, "pred"
    yield "bool target", dict(pred=p, target=torch.ones(2, 3, 4, dtype=torch.bool)), TypeError, "target"
    yield "not a tensor", dict(pred=[1.0], target=p), TypeError, "pred"
    yield "weight shape", dict(pred=p, target=p, weight=torch.rand(2)), ValueError, "weight"
    yield "weight shape BT", dict(pred=p, target=p, weight=torch.rand(3, 2)), ValueError, "weight"
    yield "weight int", dict(pred=p, target=p, weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"
    yield "weight device", dict(pred=p, target=p, weight=torch.rand(3, device="meta")), ValueError, "weight"
    yield "device", dict(pred=p, target=torch.randn(2, 3, 4, device="meta")), ValueError, "target"
    yield "empty row", dict(pred=torch.randn(2, 3, 0), target=torch.randn(2, 3, 0)), ValueError, "pred"
    yield "reduction", dict(pred=p, target=p, reduction="max"), ValueError, "reduction"
    yield "backend", dict(pred=p, target=p, backend="cudnn"), ValueError, "backend"
    yield "backend type", dict(pred=p, target=p, backend=None), TypeError, "backend"
    yield "cuda on cpu tensors", dict(pred=p, target=p, backend="cuda"), ValueError, "cuda"


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda case: case[0])
def test_bad_inputs(case):
    _, kwargs, error, name = case
    with pytest.raises(error, match=name):
        kvpo_kernels.velocity_energy(**kwargs)


# ---------------------------------------------------------------------------------------------- torch.library

NATIVE_CPU_BACKENDS = [name for name in CPU_BACKENDS if name != "torch"]


@pytest.mark.parametrize("backend", NATIVE_CPU_BACKENDS)
def test_opcheck(backend):
    pred = torch.randn(2, 3, 5, 7).transpose(2, 3).requires_grad_()
    target = torch.randn(2, 3, 7, 5, requires_grad=True)
    weight = torch.rand(3, requires_grad=True)
    torch.library.opcheck(_velocity_energy_op, (pred, target, weight, True, backend))
    torch.library.opcheck(_velocity_energy_op, (pred, target, None, False, backend))
    grad = torch.randn(2, 3)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(_velocity_energy_backward_op,
                              (grad, pred.detach(), target.detach(), weight.detach(), True, backend, *need))


@pytest.mark.parametrize("backend", NATIVE_CPU_BACKENDS)
def test_custom_op_path_matches_eager_path(backend):
    """Eager calls use an autograd.Function, traced ones the custom op: same launchers, bitwise the same results."""
    pred = torch.randn(2, 3, 301, requires_grad=True)
    target = torch.randn(2, 3, 301, requires_grad=True)
    weight = torch.rand(3, requires_grad=True)
    grad = torch.randn(2, 3)
    eager = kvpo_kernels.velocity_energy(pred, target, weight, reduction="sum", backend=backend)
    traced = _velocity_energy_op(pred, target, weight, False, backend)
    assert torch.equal(eager, traced)
    for a, b in zip(torch.autograd.grad(eager, (pred, target, weight), grad),
                    torch.autograd.grad(traced, (pred, target, weight), grad)):
        assert torch.equal(a, b)


@pytest.mark.skipif(machine_unavailable("cpu") is not None, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    """A compiled function calling the op (auto backend: the C++ one here) matches eager, forward and backward."""
    def loss(pred, target, weight):
        energy = kvpo_kernels.velocity_energy(pred, target, weight, reduction="mean")
        return (energy * torch.arange(1, 4, dtype=energy.dtype)).sum()

    pred = torch.randn(2, 3, 50, requires_grad=True)
    target = torch.randn(2, 3, 50, requires_grad=True)
    weight = torch.rand(3)
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(pred, target, weight)
    got_grads = torch.autograd.grad(got, (pred, target))
    want = loss(pred, target, weight)
    want_grads = torch.autograd.grad(want, (pred, target))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------- GPU

# The kernel backends the table lists for CUDA tensors (each skipped where it cannot run).
GPU_BACKENDS = [name for name, row in backend_table("velocity_energy").items() if row.devices and "cuda" in row.devices]


def _skip_unless_gpu_backend(backend):
    why = machine_unavailable(backend)
    if why is not None:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape,weight_kind,reduction", [
    pytest.param((2, 3, 1), None, "mean", id="n1"),
    pytest.param((2, 3, 1559), "T", "sum", id="n1559", marks=pytest.mark.sanitizer),
    pytest.param((3, 5), "BT", "mean", id="rank2"),
    pytest.param((2, 3, 37, 41), "BT", "sum", id="n37x41", marks=pytest.mark.sanitizer),
    # Odd n past one block's chunk: several blocks per row + the combine pass, per-row heads of 0..3 (fp32) or
    # 0..5 (bf16/fp16) elements, three backward chunks; small enough for memcheck.
    pytest.param((2, 3, 20_001), "BT", "mean", id="n20001-split", marks=pytest.mark.sanitizer)])
def test_gpu_small(backend, dtype, shape, weight_kind, reduction, poisoned):
    _skip_unless_gpu_backend(backend)
    pred, target = _randn(shape, dtype, "cuda"), _randn(shape, dtype, "cuda")
    check_against_reference(backend, pred, target, _weight(weight_kind, *shape[:2], device="cuda"), reduction,
                            poisoned)


@pytest.mark.gpu
@pytest.mark.sanitizer
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_non_contiguous(backend, dtype, poisoned):
    """Strided rows, misaligned starts (vector loads must fall back / peel a head) and copied trailing dims."""
    _skip_unless_gpu_backend(backend)
    for _, pred, target in _non_contiguous_layouts(dtype, "cuda"):
        check_against_reference(backend, pred, target, torch.rand(3, 4, device="cuda") + 0.5, "sum", poisoned)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(8, 4, 299_520), (2, 3, 2_096_640), (1, 1, 5_000_011)], ids=str)
def test_gpu_large(backend, dtype, shape, poisoned):
    _skip_unless_gpu_backend(backend)
    pred, target = _randn(shape, dtype, "cuda"), _randn(shape, dtype, "cuda")
    check_against_reference(backend, pred, target, _weight("T", *shape[:2], device="cuda"), "mean", poisoned)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic(backend):
    _skip_unless_gpu_backend(backend)
    pred = _randn((16, 4, 299_520), torch.bfloat16, "cuda").requires_grad_()
    target = _randn(pred.shape, torch.bfloat16, "cuda").requires_grad_()
    grad = torch.randn(16, 4, device="cuda")
    runs = []
    for _ in range(3):
        energy = kvpo_kernels.velocity_energy(pred, target, reduction="sum", backend=backend)
        runs.append([energy, *torch.autograd.grad(energy, (pred, target), grad)])
    for other in runs[1:]:
        for first, again in zip(runs[0], other):
            assert torch.equal(first, again)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_current_stream_graph_capture(backend):
    """Every kernel (forward, combine, backward) launches on the caller's current stream: a CUDA graph captures a
    forward + backward on a side stream (a launch on any other stream fails the capture), and its replay on new
    inputs gives bitwise what an eager call gives."""
    _skip_unless_gpu_backend(backend)
    shape = (2, 3, 20_001)  # several blocks per row: the combine pass is captured too
    pred = _randn(shape, torch.bfloat16, "cuda").requires_grad_()
    target = _randn(shape, torch.bfloat16, "cuda").requires_grad_()
    grad = torch.randn(shape[:2], device="cuda")

    def step():
        energy = kvpo_kernels.velocity_energy(pred, target, reduction="sum", backend=backend)
        return [energy, *torch.autograd.grad(energy, (pred, target), grad)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, the CUDA partition is cached
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        pred.copy_(_randn(shape, torch.bfloat16, "cuda"))
        target.copy_(_randn(shape, torch.bfloat16, "cuda"))
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_auto_picks_cuda_and_compiles():
    pred = _randn((2, 3, 1000), torch.bfloat16, "cuda").requires_grad_()
    target = _randn(pred.shape, torch.bfloat16, "cuda")
    from kvpo_kernels.ops.velocity_energy import _choose_backend
    expected = "cuda" if machine_unavailable("cuda") is None else "triton"
    assert _choose_backend("auto", pred.device, pred.dtype) == expected
    compiled = torch.compile(lambda p, t: kvpo_kernels.velocity_energy(p, t).sum(), fullgraph=True)
    got = compiled(pred, target)
    got.backward()
    torch.testing.assert_close(got, reference.velocity_energy(pred.detach(), target).sum())


# ---------------------------------------------------------------------------------------------- sm_90 build (CPU)

_SM90_COMPILE = r'''
import json, re
import triton.language as tl
import kvpo_kernels.triton.velocity_energy as m
from _sm90 import compile_for_sm90

ALIGNED = {"pred_sb", "pred_st", "target_sb", "target_st", "N", "CHUNK"}  # as a launch on 16-aligned rows specialises


def compile_kernel(kernel, pointers, constexprs, num_warps):
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "i32")
        if name in pointers or name in ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    usage = compile_for_sm90(kernel, signature, attrs, constexprs, num_warps=num_warps)
    return {"stack": usage["stack"], "v4_loads": len(re.findall(r"ld\.global\S*\.v4", usage["ptx"]))}


results = {}
for dtype in ("fp32", "bf16", "fp16"):
    io = {"Pred_ptr": "*" + dtype, "Target_ptr": "*" + dtype, "W_ptr": "*fp32"}
    common = dict(HAS_WEIGHT=True, MEAN=True, BLOCK=m._MAX_BLOCK, ACC=tl.float32)
    for final in (True, False):
        results[f"forward-{dtype}-final{final}"] = compile_kernel(
            m._velocity_energy_forward_kernel, {**io, "Out_ptr": "*fp32"}, dict(common, FINAL=final), 8)
    results[f"backward-{dtype}"] = compile_kernel(
        m._velocity_energy_backward_kernel,
        {**io, "DPred_ptr": "*" + dtype, "DTarget_ptr": "*" + dtype, "G_ptr": "*fp32"},
        dict(common, WRITE_PRED=True, WRITE_TARGET=True), 8)
results["combine-1024"] = compile_kernel(
    m._velocity_energy_combine_kernel, {"E_ptr": "*fp32", "Partial_ptr": "*fp32", "W_ptr": "*fp32"},
    dict(HAS_WEIGHT=True, MEAN=True, ROWS_BLOCK=16, SPLITS_BLOCK=m._MAX_SPLITS), 4)
print(json.dumps(results))
'''


def test_triton_kernels_compile_for_sm90():
    """The CPU tests run the Triton kernels in the interpreter; this compiles them for sm_90 as a launch on an
    H100 would (Triton's bundled ptxas, no GPU): a kernel only the GPU compiler rejects fails here, none may spill,
    and on 16-byte aligned rows the streaming loads must be 16-byte vectors (the op is memory-bound)."""
    results = run_compile_script(_SM90_COMPILE)
    assert len(results) == 10
    for name, usage in results.items():
        if usage["stack"] is not None:
            assert usage["stack"] == 0, f"{name} spills {usage['stack']} bytes of registers to the stack"
        if not name.startswith("combine"):
            assert usage["v4_loads"] > 0, f"{name}: no 16-byte vector loads on aligned rows"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (2, 0)], ids=str)
def test_no_rows_on_every_backend(backend, shape):
    """B * T = 0 (the torch backend's reshape of 0 elements raised before the fix)."""
    pred = torch.zeros(shape, requires_grad=True)
    energy = kvpo_kernels.velocity_energy(pred, torch.zeros(shape), backend=backend)
    assert energy.shape == shape[:2]
    energy.sum().backward()
    assert pred.grad.shape == shape


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the triton backend does not run CPU tensors here")
@pytest.mark.parametrize("weight_kind,reduction", [("BT", "mean"), (None, "sum"), ("T", "mean")])
def test_triton_split_rows_on_cpu(weight_kind, reduction, poisoned, monkeypatch):
    """Rows split over several programs (partials added by the combine kernel) and several backward programs per
    row: with 64-element blocks a 1000-element row is 16 blocks, split 4 ways for 2 rows (8 interpreter programs)."""
    from kvpo_kernels.triton import velocity_energy as triton_velocity_energy

    monkeypatch.setattr(triton_velocity_energy, "_MAX_BLOCK", 64)
    combine = triton_velocity_energy._velocity_energy_combine_kernel
    launches = []

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return combine[grid]

    monkeypatch.setattr(triton_velocity_energy, "_velocity_energy_combine_kernel", CountingKernel())
    pred, target = _randn((2, 1, 1000), torch.float32), _randn((2, 1, 1000), torch.float32)
    check_against_reference("triton", pred, target, _weight(weight_kind, 2, 1), reduction, poisoned)
    assert launches, "the combine kernel did not run: the rows were not split"
