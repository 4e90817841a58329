"""A KVPO group on a diffusers WanTransformer3DModel: stream 7 blocks, fork 8 routed branches + the anchor, replay.

    python examples/streaming_wan_group.py            # tiny random Wan (2 layers, 6 tokens/frame): ~seconds, CPU
    python examples/streaming_wan_group.py --real     # Wan2.1-T2V-1.3B geometry (random weights), bf16, a GPU
    python examples/streaming_wan_group.py --real --weights longlive_base.pt   # with a local causal checkpoint

Both use the LongLive window (3 sink frames, 12-frame window, 4 nearest, 3 frames per block, 21 resident frames),
so a fork at block 7 (frame 21) routes each branch over 5 of the 14 eligible older frames.
"""
import argparse

import torch
from diffusers import WanTransformer3DModel

import kvpo_kernels
from kvpo_kernels.integrations.diffusers import (StreamingConfig, StreamingWanGenerator, WAN_T2V_1_3B_CONFIG,
                                                 load_causal_wan_weights)
from kvpo_kernels.routing import chr_routes

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
# (transformer config, latent height x width of one frame, prompt tokens): tokens per frame = (H/2) * (W/2).
GEOMETRIES = {
    "tiny": (TINY_WAN, (4, 6), 8),             # 6 tokens per frame
    "real": (WAN_T2V_1_3B_CONFIG, (60, 104), 512),  # 480x832 video: 1560 tokens per frame, UMT5 length 512
}
FORK_BLOCK, BRANCHES = 7, 8


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the Wan2.1-T2V-1.3B geometry (needs a GPU)")
    parser.add_argument("--weights", help="local Self-Forcing/LongLive generator checkpoint (original Wan names)")
    args = parser.parse_args(argv)
    wan_config, (height, width), prompt_len = GEOMETRIES["real" if args.real else "tiny"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)

    transformer = WanTransformer3DModel(**wan_config)           # random weights unless --weights
    if args.weights:
        load_causal_wan_weights(transformer, args.weights)
    transformer = transformer.to(device) if dtype == torch.float32 else transformer.to(device, dtype)
    gen = StreamingWanGenerator(transformer, StreamingConfig(latent_height=height, latent_width=width))
    channels, f = wan_config["in_channels"], gen.config.frames_per_block
    # prompt_embeds [1, L, text_dim]: the text encoder's output (UMT5 for Wan); random here.
    prompt_embeds = torch.randn(1, prompt_len, wan_config["text_dim"], device=device, dtype=dtype)
    # noise[i] [1, C, f, H, W]: the initial noise of block i of the one video being rolled out.
    noise = torch.randn(FORK_BLOCK, 1, channels, f, height, width, device=device, dtype=dtype)

    cache = gen.new_cache(1)
    for i in range(FORK_BLOCK):                                 # blocks 0..6 = latent frames 0..20
        gen.generate_block(cache, i, noise[i], prompt_embeds)
    pool = gen.route_pool(cache, FORK_BLOCK)                    # older frames a route may use: 6..19
    routes = chr_routes(pool, BRANCHES, gen.num_routed)         # 8 sorted lists of 5 frames each
    print(f"route pool {pool}\nroutes {routes}")

    cache.reserve(len(cache.frames()) + (BRANCHES + 1) * f)    # the pool never grows (copies) mid-rollout
    group = cache.fork(BRANCHES + 1)                            # 8 branches + anchor share the history: no copy
    # group_noise [9, C, f, H, W]: the initial noise of the forked block for the 8 branches and the anchor (last,
    # route None = the default window); here one shared draw, so the routed history is what differs at the start.
    group_noise = noise[0].expand(BRANCHES + 1, -1, -1, -1, -1).clone()
    out = gen.generate_block(group, FORK_BLOCK, group_noise, prompt_embeds, routes=routes + [None])  # one forward
    print(f"out.x0 {list(out.x0.shape)}, out.x_t {list(out.x_t.shape)} = [K steps, B, C, f, H, W]")

    # Replay step k of the 8 branches with gradients (the policy's x0 prediction at the rollout's noisy input),
    # and score it with the velocity energy against the rollout's own prediction.
    k = 1
    x0 = gen.predict_x0(cache.fork(BRANCHES), FORK_BLOCK, out.x_t[k, :BRANCHES], gen.sigmas[k], prompt_embeds,
                        routes=routes)                          # [8, C, f, H, W], differentiable
    energy = kvpo_kernels.velocity_energy(x0.unsqueeze(1), out.x0_pred[k, :BRANCHES].unsqueeze(1))  # fp32 [8, 1]
    energy.sum().backward()
    with_grad = sum(p.grad is not None for p in transformer.parameters())
    # The replay runs the rollout's own weights, so it reproduces the rollout: E = 0 (to rounding). After an
    # optimizer step E measures how far the policy moved, which is what the KVPO objective trains on.
    print(f"x0 {list(x0.shape)}, max energy {energy.max().item():.3g} (replay at the rollout's weights), "
          f"{with_grad} of {len(list(transformer.parameters()))} parameter tensors got a gradient")


if __name__ == "__main__":
    main()
