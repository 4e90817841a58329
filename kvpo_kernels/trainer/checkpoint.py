"""Checkpoints that survive a SIGKILL at any moment and refuse a corrupt file.

Layout in ``run.output_dir``: ``checkpoint-<step>.pt`` (torch.save of the training state) and its sidecar
``checkpoint-<step>.pt.sha256`` (the payload's SHA-256). The payload is written to a temporary name, fsynced and
renamed; the sidecar is written the same way AFTER it, so a checkpoint exists only once both are in place: a kill
at any point leaves the previous checkpoints intact and at most a temporary file or a payload without a sidecar,
which :func:`remove_leftovers` deletes at the next start. The newest :data:`KEEP` checkpoints are kept.

The training state holds no global RNG state: the trainer draws every random number from its own seeded
``torch.Generator`` (per step and group), never from torch's, numpy's or Python's global generators.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import tempfile
from typing import Any, Dict, List, Optional

import torch

from .errors import InputValueError

KEEP = 2
_NAME = re.compile(r"checkpoint-(\d+)\.pt")


class _HashingWriter:
    """A file wrapper that hashes what passes through (so the checksum costs no second read of the payload)."""

    def __init__(self, handle):
        self.handle, self.sha256 = handle, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _write_atomically(path: str, write) -> None:
    """Call ``write(handle)`` on a temporary file next to `path`, fsync it, rename it to `path` (atomic on POSIX)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"checkpoint-{step:08d}.pt")


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write `state` to `path` and its SHA-256 to ``path + ".sha256"``, both atomically, the sidecar last."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    digest = {}

    def write_payload(handle):
        writer = _HashingWriter(handle)
        torch.save(state, writer)
        digest["sha256"] = writer.sha256.hexdigest()

    _write_atomically(path, write_payload)
    _write_atomically(path + ".sha256", lambda handle: handle.write(f"{digest['sha256']}\n".encode()))


def list_checkpoints(directory: str) -> List[str]:
    """Complete checkpoints (payload and sidecar) in `directory`, oldest first."""
    found = []
    for path in glob.glob(os.path.join(directory, "checkpoint-*.pt")):
        match = _NAME.fullmatch(os.path.basename(path))
        if match and os.path.exists(path + ".sha256"):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(directory: str, keep: int = KEEP) -> None:
    """Delete all but the newest `keep` complete checkpoints (sidecar first: a half-deleted one is incomplete)."""
    for path in list_checkpoints(directory)[:-keep]:
        os.remove(path + ".sha256")
        os.remove(path)


def remove_leftovers(directory: str) -> List[str]:
    """Delete what a kill mid-save leaves: temporary files and payloads without a sidecar; returns their names."""
    complete = set(list_checkpoints(directory))
    leftovers = glob.glob(os.path.join(directory, ".checkpoint-*.tmp"))
    leftovers += [path for path in glob.glob(os.path.join(directory, "checkpoint-*.pt")) if path not in complete]
    leftovers += [path for path in glob.glob(os.path.join(directory, "checkpoint-*.pt.sha256"))
                  if path[:-len(".sha256")] not in complete and not os.path.exists(path[:-len(".sha256")])]
    for path in leftovers:
        os.remove(path)
    return sorted(os.path.basename(path) for path in leftovers)


def _file_sha256(path: str) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            sha256.update(chunk)
    return sha256.hexdigest()


def load_checkpoint(path: str, map_location: Optional[str] = "cpu", previous: Optional[str] = None) -> Dict:
    """The state saved at `path`, after checking it against its sidecar checksum. A missing sidecar, a mismatch or
    an unreadable payload raise one InputValueError naming the file and the way out (`previous`: the checkpoint
    before it, if any)."""
    way_out = (f"delete it (and its .sha256) to resume from the previous checkpoint {previous}, or pass --fresh"
               if previous else "pass --fresh to start over (the old files are kept aside)")
    try:
        with open(path + ".sha256") as handle:
            expected = handle.read().strip()
    except OSError:
        raise InputValueError(f"checkpoint {path}: no checksum file {path}.sha256 (not written by this kvpo-train "
                              f"or cut short); {way_out}") from None
    if _file_sha256(path) != expected:
        raise InputValueError(f"checkpoint {path}: corrupt (its SHA-256 does not match {path}.sha256); {way_out}")
    try:
        # weights_only: the state is tensors, numbers, strings and containers (the config as a plain dict).
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # the checksum matched: a file of some other program, or of another version
        raise InputValueError(f"checkpoint {path}: not a kvpo-train checkpoint ({type(error).__name__}); "
                              f"{way_out}") from None
