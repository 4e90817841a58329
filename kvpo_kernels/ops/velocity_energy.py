"""``velocity_energy``: validation, backend dispatch, the native launchers, autograd and the torch.library op.

    E = velocity_energy(pred, target, weight=None, *, reduction="mean", backend="auto")
    E[b, t] = weight[b, t] * reduce_j (pred[b, t, j] - target[b, t, j])^2,   reduce = mean | sum

Layers (the template every op follows): validation (here, before anything runs) -> the backend table ``_TABLE``
read by ``select_backend`` -> the custom ops ``kvpo::velocity_energy_fwd`` / ``kvpo::velocity_energy_bwd`` (fake
implementations, autograd registration; opaque to ``torch.compile``) when torch.compile traces the call, and an
equivalent ``autograd.Function`` for eager calls (the custom op's dispatch costs ~2x a Function's, as much as a
small GPU forward) -> the launchers named in the table (Triton: ``kvpo_kernels/triton/velocity_energy.py``; csrc:
``csrc/cpu``, ``csrc/cuda``, launched here). The ``torch`` backend is ``reference.velocity_energy`` itself,
differentiated by autograd (its table row has no backward).

Strides: the kernels read row (b, t) at ``b * stride(0) + t * stride(1)`` and need its trailing dims contiguous;
when they are not (e.g. a transposed or sliced trailing dim) the input is copied once with ``.contiguous()``.
Gradients come back contiguous.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .. import reference
from .._backends import Backend, check_backend_name, launcher, native_extension, register_op, select_backend
from .._device import (DTYPE_CODES, accumulation_dtype, assume_constant_result, cuda_stream, device_index,
                       launch_device, sm_count)

_OP = "velocity_energy"
_ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TABLE = {
    "cuda": Backend(dtypes=(torch.float32, torch.bfloat16, torch.float16), devices=("cuda",),
                    forward=f"{__name__}:cuda_forward", backward=f"{__name__}:cuda_backward"),
    "triton": Backend(dtypes=_ALL_DTYPES, devices=("cuda", "cpu"),
                      forward="kvpo_kernels.triton.velocity_energy:velocity_energy_forward",
                      backward="kvpo_kernels.triton.velocity_energy:velocity_energy_backward",
                      interpreter_dtypes=(torch.float32, torch.float16, torch.float64),
                      interpreter_note="the interpreter rounds to bf16 by truncation, not to nearest (an upstream "
                                       "Triton limitation: gradients one bf16 step off); bf16 is tested on the GPU"),
    "cpu": Backend(dtypes=_ALL_DTYPES, devices=("cpu",), forward=f"{__name__}:cpu_forward",
                   backward=f"{__name__}:cpu_backward"),
    "torch": Backend(dtypes=_ALL_DTYPES, forward=f"{__name__}:torch_forward"),
}
register_op(_OP, _TABLE)
# CUDA forward: each block streams a chunk that is a multiple of 256 threads x one 16-byte vector x 4 loads in
# flight, and the blocks of all rows fill the GPU once. Backward: fixed 8192-element chunks per block.
_CUDA_THREADS, _CUDA_UNROLL, _CUDA_BACKWARD_CHUNK = 256, 4, 8192


# ---------------------------------------------------------------------------------------------- validation

def _check_tensor(name: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ALL_DTYPES:
        raise TypeError(f"{_OP}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def _validate(pred, target, weight, reduction) -> None:
    _check_tensor("pred", pred)
    _check_tensor("target", target)
    if pred.dim() < 2:
        raise ValueError(f"{_OP}: pred must have shape [B, T, *] (rank >= 2), got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"{_OP}: target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if target.dtype != pred.dtype:
        raise TypeError(f"{_OP}: target must have pred's dtype {pred.dtype}, got {target.dtype}")
    if target.device != pred.device:
        raise ValueError(f"{_OP}: target must be on pred's device {pred.device}, got {target.device}")
    batch, steps = pred.shape[0], pred.shape[1]
    if batch * steps > 0 and pred.numel() == 0:
        raise ValueError(f"{_OP}: pred must have at least one element per (b, t) row, got shape {tuple(pred.shape)}")
    if weight is not None:
        _check_tensor("weight", weight)
        if weight.device != pred.device:
            raise ValueError(f"{_OP}: weight must be on pred's device {pred.device}, got {weight.device}")
        if tuple(weight.shape) not in ((steps,), (batch, steps)):
            raise ValueError(f"{_OP}: weight must have shape [T] = ({steps},) or [B, T] = ({batch}, {steps}), "
                             f"got {tuple(weight.shape)}")
    if not isinstance(reduction, str) or reduction not in ("mean", "sum"):
        raise ValueError(f"{_OP}: reduction must be 'mean' or 'sum', got {reduction!r}")


@assume_constant_result
def _choose_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend for these inputs (raises ``ValueError`` saying why when none can serve them).

    Run eagerly even under torch.compile (its answer is a constant of the graph): it probes the machine."""
    return select_backend(_OP, requested, device, dtype)


# ---------------------------------------------------------------------------------------------- native launchers

def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` if each (b, t) row is contiguous (trailing dims in row-major order), else one contiguous copy."""
    expected = 1
    for size, stride in zip(reversed(x.shape[2:]), reversed(x.stride()[2:])):
        if size != 1 and stride != expected:
            return x.contiguous()
        expected *= size
    return x


def _native_args(pred, target, weight) -> tuple:
    batch, steps = pred.shape[0], pred.shape[1]
    n = pred.numel() // (batch * steps)
    if weight is None:
        w_ptr, w_sb, w_st = 0, 0, 0
    elif weight.dim() == 1:
        w_ptr, w_sb, w_st = weight.data_ptr(), 0, weight.stride(0)
    else:
        w_ptr, w_sb, w_st = weight.data_ptr(), weight.stride(0), weight.stride(1)
    strides = (pred.stride(0), pred.stride(1), target.stride(0), target.stride(1), w_sb, w_st)
    return pred.data_ptr(), target.data_ptr(), w_ptr, batch, steps, n, strides


@functools.lru_cache(maxsize=None)
def _cuda_forward_partition(index: int, dtype: torch.dtype, n: int, rows: int) -> Tuple[int, int]:
    """(splits, chunk): at most one wave of forward blocks (occupancy x SMs), each chunk a whole number of sweeps
    of the block's 16-byte vector loads. Cached: shapes repeat from step to step."""
    module, _ = native_extension()
    device = torch.device("cuda", index)
    with torch.cuda.device(index):
        slots = max(1, module.velocity_energy_cuda_blocks_per_sm(DTYPE_CODES[dtype])) * sm_count(device)
    unit = _CUDA_THREADS * (16 // dtype.itemsize) * _CUDA_UNROLL
    units = -(-n // unit)
    splits = max(1, min(units, slots // rows))
    chunk = -(-units // splits) * unit
    return -(-n // chunk), chunk


def _native_forward(pred, target, weight, mean: bool, launch) -> torch.Tensor:
    """E ``[B, T]`` by ``launch(energy, *args)``, a csrc forward (args: pointers, sizes, strides, dtype code, mean)."""
    energy = torch.empty(pred.shape[:2], dtype=accumulation_dtype(pred.dtype), device=pred.device)
    if energy.numel() == 0:
        return energy
    launch(energy, *_native_args(pred, target, weight), DTYPE_CODES[pred.dtype], mean)
    return energy


def cpu_forward(pred, target, weight, mean: bool) -> torch.Tensor:
    """E ``[B, T]`` by the csrc CPU kernel (the launcher contract of the triton module's velocity_energy_forward)."""
    module, _ = native_extension()
    return _native_forward(pred, target, weight, mean, lambda energy, *args: module.velocity_energy_forward_cpu(
        energy.data_ptr(), *args, torch.get_num_threads()))


def cuda_forward(pred, target, weight, mean: bool) -> torch.Tensor:
    """E ``[B, T]`` by the csrc CUDA kernel, on the current stream of pred's device."""
    module, _ = native_extension()

    def launch(energy, p_ptr, t_ptr, w_ptr, batch, steps, n, strides, dtype_code, mean):
        splits, chunk = _cuda_forward_partition(device_index(pred.device), pred.dtype, n, batch * steps)
        partials = torch.empty(batch * steps * splits if splits > 1 else 0, dtype=torch.float32, device=pred.device)
        module.velocity_energy_forward_cuda(energy.data_ptr(), partials.data_ptr() if splits > 1 else 0, splits,
                                            chunk, p_ptr, t_ptr, w_ptr, batch, steps, n, strides, dtype_code, mean,
                                            cuda_stream(pred.device))

    return _native_forward(pred, target, weight, mean, launch)


def _native_backward(grad, pred, target, weight, mean: bool, need_pred: bool, need_target: bool, launch):
    """(dpred, dtarget) by ``launch(dpred_ptr, dtarget_ptr, grad_ptr, g_sb, g_st, *args)``, a csrc backward."""
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if need_pred else None
    grad_target = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if need_target else None
    if pred.numel() == 0 or not (need_pred or need_target):
        return grad_pred, grad_target
    p_ptr, t_ptr, w_ptr, batch, steps, n, strides = _native_args(pred, target, weight)
    launch(grad_pred.data_ptr() if need_pred else 0, grad_target.data_ptr() if need_target else 0, grad.data_ptr(),
           grad.stride(0), grad.stride(1), p_ptr, t_ptr, w_ptr, batch, steps, n, strides, DTYPE_CODES[pred.dtype],
           mean)
    return grad_pred, grad_target


def cpu_backward(grad, pred, target, weight, mean: bool, need_pred: bool, need_target: bool):
    module, _ = native_extension()
    return _native_backward(grad, pred, target, weight, mean, need_pred, need_target,
                            lambda *args: module.velocity_energy_backward_cpu(*args, torch.get_num_threads()))


def cuda_backward(grad, pred, target, weight, mean: bool, need_pred: bool, need_target: bool):
    module, _ = native_extension()

    def launch(gp_ptr, gt_ptr, g_ptr, g_sb, g_st, *args):
        module.velocity_energy_backward_cuda(gp_ptr, gt_ptr, g_ptr, g_sb, g_st, _CUDA_BACKWARD_CHUNK, *args,
                                             cuda_stream(pred.device))

    return _native_backward(grad, pred, target, weight, mean, need_pred, need_target, launch)


def torch_forward(pred, target, weight, mean: bool) -> torch.Tensor:
    """The torch backend: the reference itself, differentiated by autograd."""
    return reference.velocity_energy(pred, target, weight, "mean" if mean else "sum")


def _forward(pred, target, weight, mean: bool, backend: str) -> torch.Tensor:
    pred, target = _rows(pred), _rows(target)
    with launch_device(pred.device):
        return launcher(_OP, backend, "forward")(pred, target, weight, mean)


def _backward(grad, pred, target, weight, mean: bool, backend: str, need_pred: bool, need_target: bool):
    pred, target = _rows(pred), _rows(target)
    grad = grad.to(accumulation_dtype(pred.dtype))
    with launch_device(pred.device):
        return launcher(_OP, backend, "backward")(grad, pred, target, weight, mean, need_pred, need_target)


# ---------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("kvpo::velocity_energy_fwd", mutates_args=())
def _velocity_energy_op(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], mean: bool,
                        backend: str) -> torch.Tensor:
    """E ``[B, T]`` with an already chosen kernel backend (``cuda``, ``triton`` or ``cpu``); weight in E's dtype."""
    return _forward(pred, target, weight, mean, backend)


@_velocity_energy_op.register_fake
def _velocity_energy_fake(pred, target, weight, mean, backend):
    return pred.new_empty(pred.shape[:2], dtype=accumulation_dtype(pred.dtype))


@torch.library.custom_op("kvpo::velocity_energy_bwd", mutates_args=())
def _velocity_energy_backward_op(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                                 weight: Optional[torch.Tensor], mean: bool, backend: str, need_pred: bool,
                                 need_target: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dpred, dtarget), contiguous, pred's dtype; an output not asked for is an empty ``[0]`` tensor."""
    grad_pred, grad_target = _backward(grad, pred, target, weight, mean, backend, need_pred, need_target)
    empty = pred.new_empty((0,))
    return (grad_pred if grad_pred is not None else empty, grad_target if grad_target is not None else empty)


@_velocity_energy_backward_op.register_fake
def _velocity_energy_backward_fake(grad, pred, target, weight, mean, backend, need_pred, need_target):
    def out(needed: bool) -> torch.Tensor:
        return pred.new_empty(pred.shape if needed else (0,))
    return out(need_pred), out(need_target)


def _setup_context(ctx, inputs, output) -> None:
    pred, target, weight, mean, backend = inputs
    ctx.save_for_backward(pred, target, weight)
    ctx.mean, ctx.backend = mean, backend


def _grads(ctx, grad, forward, backward):
    """(dpred, dtarget, dweight, None, None) with the given forward/backward callables (ops or launchers)."""
    pred, target, weight = ctx.saved_tensors
    need_pred, need_target, need_weight = ctx.needs_input_grad[:3]
    grad_pred = grad_target = grad_weight = None
    if need_pred or need_target:
        grad_pred, grad_target = backward(grad, pred, target, weight, ctx.mean, ctx.backend, need_pred, need_target)
        grad_pred = grad_pred if need_pred else None
        grad_target = grad_target if need_target else None
    if need_weight:
        # dE/dw = the unweighted energy: one more read of the inputs, only when a weight asks for its gradient.
        grad_weight = grad * forward(pred, target, None, ctx.mean, ctx.backend)
        if weight.dim() == 1:
            grad_weight = grad_weight.sum(0)
    return grad_pred, grad_target, grad_weight, None, None


_velocity_energy_op.register_autograd(
    lambda ctx, grad: _grads(ctx, grad, _velocity_energy_op, _velocity_energy_backward_op),
    setup_context=_setup_context)


class _VelocityEnergyFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom op, without its dispatch cost.

    ``torch.library.custom_op`` adds ~20 us per call (~50 us with autograd) on a CPU core, as much as the whole
    forward of the smallest ANCHORS size on a GPU; eager calls therefore use this Function, and code traced by
    torch.compile uses the custom op (whose fake implementation and autograd registration make it traceable).
    routed_attention follows the same rule (measured there too: the custom op costs ~2x the Function)."""

    @staticmethod
    def forward(ctx, pred, target, weight, mean, backend):
        _setup_context(ctx, (pred, target, weight, mean, backend), None)
        return _forward(pred, target, weight, mean, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, grad):
        return _grads(ctx, grad, _forward, _backward)


# ---------------------------------------------------------------------------------------------- public API

def velocity_energy(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                    reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Trajectory velocity energy ``E[b, t] = weight[b, t] * reduce_j (pred[b, t, j] - target[b, t, j])^2``.

    Args:
        pred, target: ``[B, T, *]``, same shape, dtype (float32, bfloat16, float16; float64 for gradcheck) and
            device, any strides; the trailing dims are flattened into j (n = prod of trailing dims, 1 for rank 2).
        weight: None, ``[T]`` (shared by every b) or ``[B, T]``, any floating dtype (read as E's dtype).
        reduction: ``"mean"`` (divide by n) or ``"sum"`` over j.
        backend: ``"auto"`` (cuda -> triton -> cpu -> torch, by what the inputs allow; ``KVPO_BACKEND`` overrides),
            or one of ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"``; an explicit backend that cannot serve the
            inputs raises ``ValueError`` saying why.

    Returns:
        E ``[B, T]`` float32 (float64 for float64 inputs). Accumulation is fp32 (fp64); the reduction has no
        atomics, so the same inputs give bitwise the same E. Differentiable w.r.t. pred, target and weight:
        ``dpred = grad_E * weight * 2 (pred - target) / (n or 1)``, ``dtarget = -dpred``, in the inputs' dtype.
    """
    _validate(pred, target, weight, reduction)
    chosen = _choose_backend(check_backend_name(_OP, backend), pred.device, pred.dtype)
    if _TABLE[chosen].backward is None:  # differentiated by autograd
        return launcher(_OP, chosen, "forward")(pred, target, weight, reduction == "mean")
    if weight is not None:
        weight = weight.to(accumulation_dtype(pred.dtype))
    if torch.compiler.is_compiling():
        return _velocity_energy_op(pred, target, weight, reduction == "mean", chosen)
    return _VelocityEnergyFunction.apply(pred, target, weight, reduction == "mean", chosen)
