"""SKELETON (to be replaced by the velocity_energy work): dispatches to the reference only."""
from .. import reference
from .._backends import register_op


def velocity_energy(pred, target, weight=None, *, reduction="mean", backend="auto"):
    return reference.velocity_energy(pred, target, weight, reduction)


register_op("velocity_energy", lambda backend: None if backend == "torch" else "not implemented yet")
