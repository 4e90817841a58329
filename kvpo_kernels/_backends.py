"""Backend tables and dispatch, shared by every op.

Backends, in the order ``backend="auto"`` tries them: ``cuda`` (csrc kernels, CUDA tensors), ``triton`` (Triton
kernels, CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, the CI path), ``cpu`` (csrc C++ kernels, CPU
tensors), ``torch`` (pure PyTorch, anything). Each op registers one table, backend -> ``Backend`` (dtypes, devices,
head dims, launchers, extra requirement); dispatch (``select_backend``), the reasons a backend cannot serve given
inputs (``why_not``), ``available_backends()`` and ``describe_backends()`` all read that table, so adding a backend
to an op is one table entry plus its launcher files. ``select_backend`` picks the first backend that can serve the
inputs, or raises one error listing every backend's reason (as xformers' dispatcher does). An explicit backend that
cannot serve the inputs raises its reason: there is no silent fallback. ``KVPO_BACKEND`` overrides ``"auto"``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One row of an op's backend table.

    dtypes: the input dtypes it serves. devices: the tensor device types it runs (None: any). head_dims: the
    inclusive range of head dims it serves (attention ops; None: no such limit). forward / backward:
    ``"module:function"`` launchers, imported on first use (so that ``import kvpo_kernels`` imports no Triton);
    backward None: autograd differentiates the forward itself. missing: why the backend has no kernel for this op
    (the row is then only a reason). interpreter_dtypes / interpreter_note: the dtypes Triton's interpreter runs
    correctly, when fewer, and why. requirement(device or None): any further reason it cannot run (None: it can).
    """

    dtypes: Tuple[torch.dtype, ...] = ()
    devices: Optional[Tuple[str, ...]] = None
    head_dims: Optional[Tuple[int, int]] = None
    forward: Optional[str] = None
    backward: Optional[str] = None
    missing: Optional[str] = None
    interpreter_dtypes: Optional[Tuple[torch.dtype, ...]] = None
    interpreter_note: str = ""
    requirement: Optional[Callable[[Optional[torch.device]], Optional[str]]] = None


_TABLES: Dict[str, Dict[str, Backend]] = {}


def register_op(op: str, table: Dict[str, Backend]) -> None:
    """Register ``op``'s backend table (one ``Backend`` per name of ``BACKENDS``)."""
    if tuple(table) != BACKENDS:
        raise ValueError(f"{op}: the backend table must list {BACKENDS} in that order, got {tuple(table)}")
    _TABLES[op] = table


def backend_table(op: str) -> Dict[str, Backend]:
    if op not in _TABLES:
        raise ValueError(f"op must be one of {sorted(_TABLES)}, got {op!r}")
    return _TABLES[op]


def launcher(op: str, backend: str, direction: str) -> Callable:
    """The ``forward`` or ``backward`` launcher of ``op`` on ``backend``, looked up on every call (a dict lookup
    once imported), so that a test's monkeypatch of the launcher's module is seen."""
    module, name = getattr(_TABLES[op][backend], direction).split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------- the machine

@functools.lru_cache(maxsize=None)
def native_extension():
    """``(module, None)`` for the built ``kvpo_kernels._C``, or ``(None, why it is missing)``. Loaded once.

    ``KVPO_DISABLE_EXTENSION=1`` hides a built extension (CI runs part of the suite so: the pure-Python install)."""
    if os.environ.get("KVPO_DISABLE_EXTENSION", "0") == "1":
        return None, "kvpo_kernels._C is disabled by KVPO_DISABLE_EXTENSION=1"
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


def _cuda_unavailable() -> Optional[str]:
    module, why = native_extension()
    if module is None:
        return why
    if not module.built_with_cuda:
        return "kvpo_kernels._C was built without CUDA (no nvcc at install time, or KVPO_SKIP_CUDA_BUILD=1)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def _triton_unavailable() -> Optional[str]:
    why = triton_import_error()
    if why is not None:
        return why
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (Triton runs CPU tensors only under TRITON_INTERPRET=1)"
    return None


def machine_unavailable(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run on this machine at all, for any op (None if it can)."""
    return {
        "cuda": _cuda_unavailable,
        "triton": _triton_unavailable,
        "cpu": lambda: native_extension()[1],
        "torch": lambda: None,
    }[backend]()


def tensor_device_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on tensors on ``device`` on this machine (None if it can)."""
    why = machine_unavailable(backend)
    if why is not None:
        return why
    if backend == "triton" and device.type == "cpu" and not triton_interpreting():
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    return None


# ---------------------------------------------------------------------------------------------- reading a table

def _dtype_names(dtypes) -> str:
    return ", ".join(str(dtype).replace("torch.", "") for dtype in dtypes)


def why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype,
            head_dim: Optional[int] = None) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on inputs of this device, dtype (and head dim); None if it can."""
    row = backend_table(op)[backend]
    if row.missing is not None:
        return row.missing
    why = tensor_device_unavailable(backend, device)
    if why is not None:
        return why
    if row.devices is not None and device.type not in row.devices:
        return f"the {backend} backend of {op} runs {'/'.join(row.devices)} tensors, got {device.type} tensors"
    if dtype not in row.dtypes:
        return f"{backend} supports {_dtype_names(row.dtypes)}, not {_dtype_names([dtype])}"
    interpreted = backend == "triton" and device.type == "cpu"
    if interpreted and row.interpreter_dtypes is not None and dtype not in row.interpreter_dtypes:
        return f"{backend} does not run {_dtype_names([dtype])} under TRITON_INTERPRET=1: {row.interpreter_note}"
    if head_dim is not None and row.head_dims is not None and not row.head_dims[0] <= head_dim <= row.head_dims[1]:
        return f"head dim D must be in [{row.head_dims[0]}, {row.head_dims[1]}] for {backend}, got {head_dim}"
    return row.requirement(device) if row.requirement is not None else None


def machine_why_not(op: str, backend: str) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on this machine at all (for ``available_backends``)."""
    row = backend_table(op)[backend]
    if row.missing is not None:
        return row.missing
    why = machine_unavailable(backend)
    if why is None and row.requirement is not None:
        why = row.requirement(None)
    return why


def backends_for(op: str, device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None) -> List[str]:
    """Every backend that can serve ``op`` on such inputs here, in ``BACKENDS`` order (the tests' parameters)."""
    return [name for name in BACKENDS if why_not(op, name, device, dtype, head_dim) is None]


def check_backend_name(op: str, backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def select_backend(op: str, requested: str, device: torch.device, dtype: torch.dtype,
                   head_dim: Optional[int] = None) -> str:
    """Return the backend to run ``op`` on inputs on ``device`` of ``dtype`` (and ``head_dim``) with.

    An automatic choice never takes Triton's interpreter for CPU tensors (a test path, slower than every other
    backend); asking for ``"triton"`` explicitly, by argument or ``KVPO_BACKEND``, still gets it.
    """
    requested = check_backend_name(op, requested)
    if requested == "auto":
        override = os.environ.get("KVPO_BACKEND", "").strip()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"{op}: KVPO_BACKEND must be 'auto' or one of {BACKENDS}, got {override!r}")
            requested = override
    if requested != "auto":
        reason = why_not(op, requested, device, dtype, head_dim)
        if reason is not None:
            raise ValueError(f"{op}: backend={requested!r} cannot serve these inputs: {reason}")
        return requested
    reasons = {}
    for backend in BACKENDS:
        if backend == "triton" and device.type == "cpu":
            reason = "auto never picks Triton's interpreter for CPU tensors (a test path; ask for backend='triton')"
        else:
            reason = why_not(op, backend, device, dtype, head_dim)
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
    ops = [op] if op is not None else sorted(_TABLES)
    for name in ops:
        backend_table(name)
    return {name: {backend: machine_why_not(name, backend) for backend in BACKENDS} for name in ops}


def describe_backends() -> str:
    """A readable table: per op and backend, whether it runs here (or why not) and what it serves."""
    lines = []
    for op, reasons in available_backends().items():
        lines.append(op)
        for backend, why in reasons.items():
            row = _TABLES[op][backend]
            serves = ""
            if row.missing is None:
                serves = f"  [{_dtype_names(row.dtypes)}; {'/'.join(row.devices) if row.devices else 'any device'}"
                serves += f"; D {row.head_dims[0]}..{row.head_dims[1]}]" if row.head_dims else "]"
            lines.append(f"  {backend:<7} {'yes' if why is None else 'no: ' + why}{serves}")
    return "\n".join(lines)
