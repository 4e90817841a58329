"""Atomic checkpoints: model, optimizer, EMA, old/reference policies, RNG states and the step counter.

The file is written to a temporary name in the same directory, flushed and fsynced, then moved over the old one with
``os.replace`` (atomic on POSIX): a crash mid-write leaves the previous checkpoint intact, never a torn one.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """Every random number generator the trainer may touch (torch CPU and CUDA, numpy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    # RNG states must be CPU byte tensors (the CUDA ones too), whatever map_location the checkpoint was loaded with.
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write `state` (any torch-serialisable dict) to `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    # weights_only=False: the state holds numpy / Python RNG states, written by this trainer itself.
    return torch.load(path, map_location=map_location, weights_only=False)
