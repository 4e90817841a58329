"""kvpo_kernels: fused kernels for KVPO-style GRPO training of streaming autoregressive video generators.

Public API:
    routed_attention(q, k_cache, v_cache, block_table, ...)   attention over a shared paged KV pool, fwd + bwd
    velocity_energy(pred, target, weight=None, ...)           batched trajectory velocity energy, fwd + bwd
    available_backends()                                       which backends run here, and why not the others
"""
from ._backends import available_backends, describe_backends
from .ops.routed_attention import routed_attention
from .ops.velocity_energy import velocity_energy

__version__ = "0.1.0"

__all__ = ["routed_attention", "velocity_energy", "available_backends", "describe_backends", "__version__"]
