"""MemFlow's KV memory bank (the second backbone of the released KVPO code): the rule, and its two helpers.

MemFlow (Richard-Zhang-AI/KVPO ``models/memflow``) is LongLive's causal Wan2.1-T2V-1.3B (sink 3, window 12, blocks
of 3 frames) plus, in every self-attention layer, a bank of ``bank_size`` (S = 3) frames of K/V. Here it is the
streaming generator with ``StreamingConfig(memory_bank_frames=S, bank_record_interval=ri)``; the bank is held as
the released one, copies: per sequence S slot blocks and one pending block of the group KV cache (layer l's plane
of slot j holds the frame layer l keeps there), so forks share them by refcount like any history block and a
branch copies them on its first write (``GroupKVCache`` docstring).

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
  keep different frames). The kept slots go in ``torch.topk``'s order (l. 1233, 1251: descending score, then
  ``k_new``), which decides the ties of a prompt switch (below).
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
reads the bank in between, and a snapshot taken in between is re-updated identically by every branch. A record
copies the frame's K/V as committed into the pending block (``k_new``); a later step that repeats it reuses that
copy, even when a prompt switch has re-encoded the frame's window entry since.

Prompt switches (``StreamingWanGenerator.recache``; only the "rollout" rule: ``causal_inference.py`` has none).
Released: ``pipeline/diversity_sampling.py`` ``recache_after_switch`` (l. 193-256; the trainer calls it at a
segment change, ``trainer/kvpo.py`` l. 1115, 1225, 1344; ``interactive_causal_inference.py`` l. 34-100 does the
same):

- It zeroes the cross-attention cache (``is_init`` False, l. 207-209), runs ONE forward of the last ``n =
  min(local_attn_size, s)`` committed frames at ``context_noise`` from frame ``s - n`` with ``update_bank=False,
  update_cache=True, q_bank=True, is_recache=True`` (l. 216-250), and zeroes the cross-attention cache again
  (l. 253-255).
- Bank step: ``_forward_inference`` runs ``_apply_cache_updates_before`` (``causal_model.py`` l. 1372-1373) before
  any layer, so with the zeroed text keys: a full bank's ``compress_kv_bank`` scores every slot 0 (l. 1218) and
  keeps the slots ``torch.topk`` returns for the tie (l. 1233), then appends ``k_new``; a bank not full writes
  ``k_new`` to slot L - 1 (l. 1154-1156), the same write as without a switch. The next block's first step
  (``streaming_training.py`` l. 182-183, q_bank) runs before its layers re-initialise the cross-attention cache
  (``wan/modules/model.py`` l. 174-180), so it repeats the same all-0 step, which changes nothing (the tie keeps
  the same slots and the last already holds ``k_new``). So the bank step between the commit before a switch and
  the next block is ONE step with every score 0, not the prompt-scored step of a block without a switch: here
  ``commit_block(..., before_switch=True)`` (``generate`` and the trainer's rollouts pass it) makes the commit's
  step that one, and the re-cache refuses a bank whose last step was scored. Tie order: the release does not fix
  it (``torch.topk`` on ties is unspecified); ours runs ``torch.topk`` on the CPU, whatever the scores' device
  (torch 2.13: of 3 zeros slots 0, 1, the released S = 3; of 2 slot 0; of 4 slots 2, 3, 0).
- The re-cache forward's bank read: ``is_recache`` makes ``is_update_bank`` False (l. 493-496, 510-513), so it
  reads ``bank[:min(local_end_bank, S)]`` (l. 500, 517) with ``local_end_bank = L + current_end_bank - G`` = L
  (its ``current_end`` is the switch frame, whose ``current_end_bank`` the last record set): every slot.
  ``update_bank=False`` leaves G, L and ``k_new`` (l. 1102, 1124, 1133).
- Its attention (``k_cat``, l. 522) is ``[sink | bank | local]`` with ``local`` the last ``local_budget =
  (local_attn_size - sink) T`` tokens (l. 482, 506-508) of the cache after this forward's own write, for every
  query, with no causal mask. The write (l. 404, 450) protects the sink when ``current_start > 0`` (l. 367,
  ``is_recompute``; the counters then stay, l. 1130): for s > window the frames ``[max(sink, s - window), s)``
  get new K/V; the newest ``window - sink`` of them are the ``local`` keys; the older ones (queries only, whose
  keys no query of this forward reads) run here in a second forward that reads ``[sink | bank | newest]`` and not
  itself (``attend_self=False``). For s <= window the forward starts at frame 0 and rewrites all of ``[0, s)``,
  the sink included, each frame reading the bank and all of them.
- ``switch_causal_inference.py``'s re-cache (l. 35-96) passes no ``kv_bank``: MemFlow's model cannot run it
  (``kv_bank[block_index]``, ``causal_model.py`` l. 1385, 1409); not a MemFlow path.

KVPO's routed blocks: the released MemFlow reads, in a perturbed block, ``[bank | 9 older cache slots | m = 3
nearest frames]`` with no separate sink (``_build_perturbed_local_window``, l. 190-228, used at l. 483-504; the
slots are drawn from ``[0, min(s, cache) - 3)``, which includes the sink slots, ``diversity_sampling.
plan_perturbation`` l. 67-83), and a slot names another frame at each block once the cache rolls. That is
``StreamingConfig(route_layout="memflow")`` (the ``memflow1.3b`` preset): routes of cache slots, translated per
block by :meth:`GroupKVCache.route_frames`. The default ``"sink"`` reads ``[sink | bank | route | nearest]`` with
``window - sink - nearest = 6`` absolute frames from :meth:`GroupKVCache.route_pool`.

What is not reproduced (checked against the released code, not implemented here):

- ``SMA`` (top-k routed bank attention, off in ``configs/train_kvpo_memflow.yaml``) is absent.
- The released trainer skips the re-cache when a switch falls on the perturbed chunk's start (its prefix loop stops
  before that chunk, ``trainer/kvpo.py`` l. 1107-1122, and the branches start in the new segment, l. 1214-1232;
  the in-chunk prefix before the fork is generated with the old segment's prompt, l. 1163-1168); ours re-caches
  at every switch (``trainer/rollout.py``), for LongLive and MemFlow alike.
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
