"""SKELETON (to be replaced by the routed_attention work): dispatches to the reference only."""
from .. import reference
from .._backends import register_op


def routed_attention(q, k_cache, v_cache, block_table, block_counts=None, k_new=None, v_new=None, *,
                     softmax_scale=None, return_lse=False, backend="auto"):
    return reference.routed_attention(q, k_cache, v_cache, block_table, block_counts, k_new, v_new,
                                      softmax_scale=softmax_scale, return_lse=return_lse)


register_op("routed_attention", lambda backend: None if backend == "torch" else "not implemented yet")
