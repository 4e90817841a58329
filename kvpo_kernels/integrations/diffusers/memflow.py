"""MemFlow's KV memory bank (the second backbone of the released KVPO code): the rule, and its two helpers.

MemFlow (Richard-Zhang-AI/KVPO ``models/memflow``) is LongLive's causal Wan2.1-T2V-1.3B (sink 3, window 12, blocks
of 3 frames) plus, in every self-attention layer, a bank of ``bank_size`` (S = 3) frames of K/V. Here it is the
streaming generator with ``StreamingConfig(memory_bank_frames=S, bank_record_interval=ri)``; the bank frames are
blocks of the group KV cache (references, no copy), so forks share them like any history frame.

The released rule (``wan/modules/causal_model.py``: ``CausalWanSelfAttention.forward`` l. 347-530,
``CausalWanModel._apply_cache_updates`` l. 1063-1136, ``_apply_cache_updates_before`` l. 1138-1168,
``compress_kv_bank`` l. 1170-1261), per layer, with frames of T tokens and blocks of f = 3 frames. The bank holds
slots ``k, v`` and counters G, L (tokens), plus a pending frame ``k_new``:

- Every forward of block i computes ``current_end_bank = ((i + 1) - 1) // ri + 1`` frames (its ``current_end //
  (3 T)`` is i + 1; the ``3`` is f hard-coded) and ``local_end_bank = L + current_end_bank - G``. After a commit
  forward (``update_cache``: ``_apply_cache_updates`` runs only then, l. 1424) run with ``update_bank``, ``k_new``
  becomes the **first frame** of the block (``new_k[:, :1560]``: the keys as cached, RoPE'd at the frame's
  absolute position; the bank never re-rotates them), and G, L take those values.
- At the first denoising step of block i (``q_bank=True``, before any layer runs): when L >= 1 frame, ``k_new``
  goes to slot L - 1 if L <= S (overwriting that slot, or opening it); otherwise the bank is full and
  ``compress_kv_bank`` keeps the S - 1 slots of highest text saliency and appends ``k_new``. Saliency of a slot:
  the mean over the prompt's tokens t (the layer's cross-attention keys ``norm_k(k(text))``, all 512 padded
  tokens), the heads and the slot's T tokens s of ``q_t . k_s / sqrt(D)``, per sequence and per layer (so layers
  keep different frames).
- Block i attends to ``[sink | bank[:n] | local]`` (``k_cat``, l. 522), ``n = min(local_end_bank - T *
  [i % ri == 0], S T)``: that is every slot written so far (block 0: none). A bank frame that is also in the sink
  or the window is attended twice (the concatenation repeats it).

Which commits run with ``update_bank`` differs between the two released pipelines (``bank_rule``):

- ``"rollout"`` (``pipeline/streaming_training.py`` l. 160-167 and 286-297, the one KVPO's rollouts run through
  ``diversity_sampling.generate_chunk_sampling``): only the commit of a record block (``start_frame % (3 ri) ==
  0``). So the bank records the first frame of blocks 0, ri, 2 ri, ... into slots 0, 1, 2, ...; once full (block
  ``S ri + 1`` on), **every** block compresses with the latest record frame again, so that frame can fill several
  slots (the bank may end up holding it S times until the next record).
- ``"inference"`` (``pipeline/causal_inference.py`` l. 161-226): every commit (its denoising forwards pass
  ``update_bank=True`` too but write nothing). The last slot takes the first frame of every block and advances
  every ri blocks: with S = ri = 3 the bank is [6, 15, 24] at block 9 (the first frame of the block before each
  record block), then each block evicts one slot.

KVPO's replay (``trainer/kvpo.py`` l. 2043-2056) runs every forward with ``update_bank=False`` but ``q_bank`` at
each block's first step: no new frame is recorded, and the bank step repeats with the snapshot's pending frame
(``commit_block(..., record_bank=False)``; the trainer's replay passes it).

Equivalent frame-level form used here: after committing block j, the recorded block is r = j ("inference") or
``r = j - j % ri`` ("rollout"); its first frame r f goes to slot ``r // ri``, or (slot >= S) replaces the least
salient slot. Doing this at the end of block j's commit instead of at block j + 1's first step is the same: nothing
reads the bank in between, and a snapshot taken in between is re-updated identically by every branch.

What is not reproduced (checked against the released code, not implemented here):

- KVPO's routed blocks in the released MemFlow read ``[bank | 9 older cache slots + m = 3 nearest frames]`` with
  no separate sink (``_build_perturbed_local_window``, l. 190-228; the slots are drawn from ``[0, min(s, cache) -
  3)``, which includes the sink frames, ``diversity_sampling.plan_perturbation``). Ours reads ``[sink | bank |
  route | nearest]`` with ``window - sink - nearest = 6`` routed frames from :meth:`GroupKVCache.route_pool`.
- Prompt switches (the released re-cache runs ``q_bank`` with a zeroed cross-attention cache) and ``SMA`` (top-k
  routed bank attention, off in ``configs/train_kvpo_memflow.yaml``) raise / are absent.
"""
from __future__ import annotations

import torch

from ...cache import GroupKVCache
from .config import StreamingConfig


def bank_record_slot(config: StreamingConfig, block_index: int) -> tuple[int, int]:
    """``(frame, slot)`` that the bank takes after block ``block_index``'s commit under ``config.bank_rule``."""
    ri = config.bank_record_interval
    recorded = block_index if config.bank_rule == "inference" else block_index - block_index % ri
    return recorded * config.frames_per_block, recorded // ri


@torch.no_grad()
def bank_saliency(transformer, cache: GroupKVCache, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """``[num_layers, B, slots]`` float32: the released ``compress_kv_bank`` score of every bank slot.

    Per layer: the mean over text tokens t, heads and the slot's tokens s of ``q_t . k_s / sqrt(D)``, with q_t the
    layer's cross-attention keys of ``prompt_embeds [B, L, text_dim]`` (``norm_k(to_k(text_embedder(.)))``) and
    k_s the slot's cached, RoPE'd self-attention keys. The means commute with the dot product, so this is the
    head-mean of ``mean_t(q_t) . mean_s(k_s) / sqrt(D)``: no [text x frame] score matrix is formed.
    """
    dtype = transformer.patch_embedding.weight.dtype
    text = transformer.condition_embedder.text_embedder(prompt_embeds.to(dtype))
    scores = []
    for layer, block in enumerate(transformer.blocks):
        attn = block.attn2
        text_k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1)).float()  # [B, L, H, D]
        ids = torch.tensor(cache.bank_blocks(layer), dtype=torch.long, device=cache.device)  # [B, n]
        k_bank = cache.layer(layer)[0][ids].float()  # [B, n, S, H, D]
        dots = (k_bank.mean(2) * text_k.mean(1)[:, None]).sum(-1)  # [B, n, H]
        scores.append(dots.mean(-1) * text_k.shape[-1] ** -0.5)
    return torch.stack(scores)
