"""Backend discovery and dispatch, shared by every op.

Backends, in the order ``backend="auto"`` tries them: ``cuda`` (csrc kernels, CUDA tensors), ``triton`` (Triton
kernels, CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, the CI path), ``cpu`` (csrc C++ kernels, CPU
tensors), ``torch`` (``reference.py``, anything). Each op states, per backend, why it cannot serve given inputs;
``select_backend`` picks the first that can, or raises one error listing every backend's reason (as xformers'
dispatcher does). An explicit backend that cannot serve the inputs raises its reason: there is no silent fallback.
``KVPO_BACKEND`` in the environment overrides ``"auto"``.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")

# op name -> function(backend) -> None if the backend can run on this machine at all, else why not.
_OP_CAPABILITIES: Dict[str, Callable[[str], Optional[str]]] = {}


@functools.lru_cache(maxsize=None)
def native_extension():
    """``(module, None)`` for the built ``kvpo_kernels._C``, or ``(None, why it is missing)``. Loaded once."""
    try:
        return importlib.import_module("kvpo_kernels._C"), None
    except ImportError as err:
        return None, f"the C++ extension kvpo_kernels._C is not built ({err}); reinstall with cmake and a C++ compiler"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def cuda_backend_unavailable() -> Optional[str]:
    module, why = native_extension()
    if module is None:
        return why
    if not module.built_with_cuda:
        return "kvpo_kernels._C was built without CUDA (no nvcc at install time, or KVPO_SKIP_CUDA_BUILD=1)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def triton_backend_unavailable() -> Optional[str]:
    why = triton_import_error()
    if why is not None:
        return why
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (Triton runs CPU tensors only under TRITON_INTERPRET=1)"
    return None


def cpu_backend_unavailable() -> Optional[str]:
    return native_extension()[1]


def machine_unavailable(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run on this machine at all (None if it can)."""
    return {
        "cuda": cuda_backend_unavailable,
        "triton": triton_backend_unavailable,
        "cpu": cpu_backend_unavailable,
        "torch": lambda: None,
    }[backend]()


def tensor_device_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on tensors on ``device`` on this machine (None if it can)."""
    why = machine_unavailable(backend)
    if why is not None:
        return why
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got {device.type} tensors"
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run {device.type} tensors"
    return None


def register_op(op: str, capability: Callable[[str], Optional[str]]) -> None:
    """Register ``op`` for ``available_backends``: ``capability(backend)`` says why a backend cannot run it here."""
    _OP_CAPABILITIES[op] = capability


def check_backend_name(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def select_backend(op: str, requested: str, why_not: Callable[[str], Optional[str]], device_type: str) -> str:
    """Return the backend to run ``op`` on inputs on ``device_type`` with.

    ``why_not(backend)`` returns None when the backend can serve the inputs, else the reason it cannot. An automatic
    choice never takes Triton's interpreter for CPU tensors (a test path, slower than every other backend); asking for
    ``"triton"`` explicitly, by argument or ``KVPO_BACKEND``, still gets it.
    """
    requested = check_backend_name(requested)
    if requested == "auto":
        override = os.environ.get("KVPO_BACKEND", "").strip()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"KVPO_BACKEND must be 'auto' or one of {BACKENDS}, got {override!r}")
            requested = override
    if requested != "auto":
        reason = why_not(requested)
        if reason is not None:
            raise ValueError(f"{op}: backend={requested!r} cannot serve these inputs: {reason}")
        return requested
    reasons = {}
    for backend in BACKENDS:
        if backend == "triton" and device_type == "cpu":
            reason = "auto never picks Triton's interpreter for CPU tensors (a test path; ask for backend='triton')"
        else:
            reason = why_not(backend)
        if reason is None:
            return backend
        reasons[backend] = reason
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    raise ValueError(f"{op}: no backend can serve these inputs ({detail})")


def available_backends(op: Optional[str] = None) -> Dict[str, Dict[str, Optional[str]]]:
    """Per op, per backend: None if the backend can run here, else why not.

    >>> kvpo_kernels.available_backends()["velocity_energy"]["cuda"]
    'no CUDA device is visible to torch'
    """
    ops = [op] if op is not None else sorted(_OP_CAPABILITIES)
    unknown = [name for name in ops if name not in _OP_CAPABILITIES]
    if unknown:
        raise ValueError(f"op must be one of {sorted(_OP_CAPABILITIES)}, got {unknown[0]!r}")
    return {name: {backend: _OP_CAPABILITIES[name](backend) for backend in BACKENDS} for name in ops}


def describe_backends() -> str:
    """A readable table of ``available_backends()``."""
    lines = []
    for op, table in available_backends().items():
        lines.append(op)
        for backend, why in table.items():
            lines.append(f"  {backend:<7} {'yes' if why is None else 'no: ' + why}")
    return "\n".join(lines)
