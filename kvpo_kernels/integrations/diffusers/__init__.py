"""Streaming (block-causal) rollouts of a diffusers ``WanTransformer3DModel`` over a :class:`GroupKVCache`.

One module per concern (the public names are re-exported here):

- ``config``: :class:`StreamingConfig` (geometry + sampler), ``WAN_T2V_1_3B_CONFIG``, :class:`BlockRollout`.
- ``processor``: :class:`RoutedWanAttnProcessor`, the self-attention processor. Inside a streaming forward it
  applies RoPE at the block's absolute frame offset (so positions match a full-sequence forward), optionally
  writes the block's RoPE'd K/V into the group cache, and attends through :func:`kvpo_kernels.routed_attention`:
  the cached history through each sequence's row of one batched block table, then the block's own K/V as
  ``k_new``/``v_new``. Outside a streaming forward it behaves exactly like diffusers' ``WanAttnProcessor``.
  Cross-attention is left unchanged.
- ``sampler``: :class:`StreamingWanGenerator`, the few-step block-by-block sampler of the distilled causal Wan
  generators (Self-Forcing / LongLive): per block, per step, predict x0 (flow matching ``x0 = x_t - sigma * v``)
  and re-noise to the next sigma; then one forward on the clean block at timestep ``context_noise`` (0) writes
  its K/V into the cache. All sequences of a cache (a group's branches and the anchor) run batched in one
  forward, each with its own route. Multi-prompt videos (LongLive): at a prompt switch, ``recache`` re-encodes
  the retained window under the new prompt in one batched forward into fresh cache blocks (global sink).
- ``memflow``: MemFlow's KV memory bank (``StreamingConfig.memory_bank_frames``): the released bank rule, the
  frame it records and the text saliency that evicts. The bank is S slot blocks + 1 pending block of the cache
  per sequence (copies, each layer's plane holding its own frames); every layer reads ``[sink | bank | local]``
  through one block table.
- ``weights``: :func:`load_causal_wan_weights` maps Self-Forcing / LongLive checkpoints (original Wan names,
  ``.pt`` or safetensors) onto ``WanTransformer3DModel``.

Plugging into your own transformer (a KVPO group: rollout to frame 21, fork, 8 routed branches + the anchor)::

    from kvpo_kernels.integrations.diffusers import (StreamingConfig, StreamingWanGenerator, WAN_T2V_1_3B_CONFIG,
                                                     load_causal_wan_weights)
    from kvpo_kernels.routing import chr_routes

    transformer = WanTransformer3DModel(**WAN_T2V_1_3B_CONFIG).to("cuda", torch.bfloat16)
    load_causal_wan_weights(transformer, "longlive_base.pt")          # local file, original Wan key names
    gen = StreamingWanGenerator(transformer, StreamingConfig())        # LongLive geometry, 60 x 104 latents
    cache = gen.new_cache(1)
    for i in range(7):                                                 # blocks 0..6 = frames 0..20
        gen.generate_block(cache, i, noise[i], prompt_embeds)
    routes = chr_routes(gen.route_pool(cache, 7), 8, gen.num_routed)   # 8 routes of 5 frames among 6..19
    group = cache.fork(9)                                              # shares the history: no K/V copy
    out = gen.generate_block(group, 7, group_noise, prompt_embeds, routes=routes + [None])  # one batched forward
    x0 = gen.predict_x0(cache.fork(8), 7, out.x_t[k, :8], gen.sigmas[k], prompt_embeds, routes=routes)  # has grad

``cache`` is untouched by the group (a snapshot), so replays fork it again.
"""
from .config import WAN_T2V_1_3B_CONFIG, BlockRollout, StreamingConfig
from .processor import RoutedWanAttnProcessor, install_routed_attention
from .sampler import StreamingWanGenerator
from .weights import convert_causal_wan_state_dict, load_causal_wan_weights

__all__ = ["StreamingConfig", "StreamingWanGenerator", "BlockRollout", "RoutedWanAttnProcessor",
           "install_routed_attention", "convert_causal_wan_state_dict", "load_causal_wan_weights",
           "WAN_T2V_1_3B_CONFIG"]
