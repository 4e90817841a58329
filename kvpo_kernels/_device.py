"""What every op's launchers share: accumulation dtype, dtype codes for csrc, SM count, current stream, the
launch-device guard, and the torch.compile marker for a backend choice. Imports nothing from ops/ or triton/.
"""
from __future__ import annotations

import contextlib
import functools

import torch

# log2(e): the kernels run the softmax in base 2, with the scale folded into softmax_scale * LOG2E.
LOG2E = 1.4426950408889634

# The dtype codes csrc/velocity_energy.h switches on (keep in sync with its ``DType`` enum).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (the exact path); every lower precision accumulates in fp32, as the kernels do."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device for a bare ``cuda``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the launchers ask on every call)."""
    return _sm_count(device_index(device))


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer handle (the raw getter skips a Stream object)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device_index(device)) if raw is not None else torch.cuda.current_stream(device_index(device)).cuda_stream


def launch_device(device: torch.device):
    """Make the inputs' GPU current: Triton and the csrc launchers launch on the current device and its current
    stream, whatever device the pointers live on (tensors on cuda:1 must not be run by a launch on cuda:0)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its ``import torch._dynamo`` (~1.5 s at package import).

    That decorator only sets this attribute, which dynamo reads when it meets ``fn`` while tracing: the call is then
    run eagerly and its result becomes a constant of the graph. tests/test_backends.py checks that torch's decorator
    still sets exactly this, so a torch that changes the mechanism fails a test instead of compiling silently."""
    fn._dynamo_marked_constant = True
    return fn
