"""The released KVPO recipe (docs/recipe.md): which energy the replay computes, the route pool for P >= 1, the fork
positions, the old-policy window and LR warmup, and the `wan1.3b` preset value for value (built on the meta device)."""
import pytest
import torch

from kvpo_kernels.cache import GroupKVCache
from kvpo_kernels.trainer.config import PRESETS, chunk_layout, load_config
from kvpo_kernels.trainer.loop import Trainer
from kvpo_kernels.trainer.rollout import group_rollout, replay_energies

from _trainer_setup import FAST, one_thread  # noqa: F401  (autouse fixture)


def tiny(tmp_path, *overrides):
    return load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}"] + list(overrides))


# ------------------------------------------------------------------------------------------------ item 1: energy
def test_replay_computes_the_released_x0_residual(tmp_path):
    """E[g, 0, k] = mean (x0_replay - x0_rollout)^2 at every step (released log p = -sum mse / (2 max(sigma,1)^2)),
    no 1 / sigma^2; the velocity option is exactly that divided by sigma_k^2. The trainer's default is x0."""
    trainer = Trainer(tiny(tmp_path))
    assert trainer.config.replay.energy_space == "x0" and trainer.config.replay.energy_scale == 1.0
    generator, G = trainer.generator, 2
    rollout = group_rollout(generator, trainer.prompts[:1], prompt_id=0, num_blocks=7, fork_block=5,
                            perturbed_blocks=1, num_branches=G, num_routed=2, latent_shape=trainer.latent_shape,
                            rng=torch.Generator().manual_seed(4))
    with torch.no_grad():
        energy = replay_energies(generator, rollout, num_blocks=1, grad_steps=1, backend="torch")
        velocity = replay_energies(generator, rollout, num_blocks=1, grad_steps=1, energy_space="velocity",
                                   backend="torch")
        trained = trainer._replay(rollout, grad=False)
        cache, embeds = rollout.prefix_cache.fork(G), rollout.prompt_embeds[0].expand(G, -1, -1)
        sigmas = rollout.sigmas
        want = torch.stack([
            (generator.predict_x0(cache, 5, rollout.x_t[0, k, :G], sigmas[k], embeds) - rollout.x0_pred[0, k, :G])
            .double().square().flatten(1).mean(1) for k in range(sigmas.numel())], dim=1)  # [G, K]
    assert energy.shape == (G, 1, 4) and (want > 0).all()
    torch.testing.assert_close(energy[:, 0].double(), want, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(velocity[:, 0].double(), want / sigmas.double().square(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(trained[:, :1], energy, rtol=0, atol=0)  # the trainer replays its policy window
    assert not torch.allclose(energy, velocity)  # sigma_k < 1 after the first step: the two forms differ


def test_energy_space_is_validated(tmp_path):
    with pytest.raises(ValueError, match="replay.energy_space"):
        tiny(tmp_path, "replay.energy_space=v")


# ---------------------------------------------------------------------------------------------- item 9: route pool
def _stream_to(cache, frames):
    while cache.num_frames < frames:
        cache.append_frames()
        cache.evict()


@pytest.mark.parametrize("cache_frames", [21, 33])
@pytest.mark.parametrize("perturbed_blocks", [1, 2, 5])
@pytest.mark.parametrize("fork_frame", [21, 24, 39, 114])
def test_route_pool_is_every_frame_resident_through_the_last_perturbed_block(cache_frames, perturbed_blocks,
                                                                             fork_frame):
    """Our pool: [max(sink, s + (P-1) f - (cache - sink - f)), s - (nearest - f)). Each frame of it stays resident
    (and routable) while each of the P perturbed blocks is generated, and the pool is maximal: the frame before it
    is evicted by the last perturbed block, the frame after it is one of the first block's nearest frames."""
    f, sink, nearest = 3, 3, 4
    cache = GroupKVCache(1, 2, 1, 4, frames_per_block=f, sink_frames=sink, window_frames=12, nearest_frames=nearest,
                         cache_frames=cache_frames, device="meta")
    _stream_to(cache, fork_frame)
    pool = cache.route_pool(fork_frame, perturbed_blocks)
    last = fork_frame + (perturbed_blocks - 1) * f
    assert pool == list(range(max(sink, last - (cache_frames - sink - f)), fork_frame - (nearest - f)))
    for block in range(perturbed_blocks):
        start = fork_frame + block * f
        _stream_to(cache, start)
        assert set(pool) <= set(cache.frames(0)), (block, sorted(set(pool) - set(cache.frames(0))))
        cache.visible_frames(start, pool)  # every pool frame is an older frame of this block: no error
    if pool[0] > sink:
        assert pool[0] - 1 not in cache.frames(0)  # evicted by the time the last perturbed block runs
    with pytest.raises(ValueError, match="older frame"):
        cache.visible_frames(fork_frame, [pool[-1] + 1])


def test_route_pool_against_the_released_plan():
    """Released plan_perturbation (diversity_sampling.py): [max(sink, s + f(P-1) - (cache - sink)), s - m_nearest).
    At the released geometry (cache 33, P = 5) it starts one block (3 frames) earlier than ours at every fork (its
    cache size does not count the block being written): at forks 21 and 24 it names frames 3..5 / 6..8 that our
    cache has evicted before the last perturbed block; from fork 39 on, where the released slot mapping reads one
    block later than its plan, the frames read are ours (docs/recipe.md). Both pools hold 14 frames."""
    def released(s, P, f=3, sink=3, cache=33, m_nearest=4):
        return list(range(max(sink, s + f * (P - 1) - (cache - sink)), s - m_nearest))

    cache = GroupKVCache(1, 2, 1, 4, frames_per_block=3, sink_frames=3, window_frames=12, nearest_frames=4,
                         cache_frames=33, device="meta")
    assert released(21, 5) == list(range(3, 17)) and cache.route_pool(21, 5) == list(range(6, 20))
    assert released(24, 5) == list(range(6, 20)) and cache.route_pool(24, 5) == list(range(9, 23))
    for fork in (21, 24, 39, 42, 111, 114):
        ours = cache.route_pool(fork, 5)
        assert len(ours) == len(released(fork, 5)) == 14
        assert ours == [frame + 3 for frame in released(fork, 5)]


# ----------------------------------------------------------------------------------- item 6: forks, chunks, preset
def test_chunk_layout_and_fork_positions_of_the_wan_preset():
    assert chunk_layout(147, 21, 18) == [(0, 21)] + [(21 + 18 * i, 39 + 18 * i) for i in range(7)]
    assert chunk_layout(10, 0, 0) == [(0, 10)] and chunk_layout(25, 21, 18) == [(0, 21), (21, 25)]
    config = load_config("wan1.3b")
    # released: P = 5 blocks inside one of the first 7 chunks, at frame >= local_attn_size: 12 starts, 21 .. 114
    assert [3 * block for block in config.fork_blocks()] == [21, 24, 39, 42, 57, 60, 75, 78, 93, 96, 111, 114]
    assert all(config.streaming.route_pool_size(block, 5) == 14 for block in config.fork_blocks())
    assert load_config("tiny").fork_blocks() == [5, 6]  # chunks [0, 5), [5, 7), [7, 8): both forks eligible


def test_fork_chunk_fields_are_validated(tmp_path):
    with pytest.raises(ValueError, match="rollout.streaming_chunk_size"):
        tiny(tmp_path, "rollout.streaming_chunk_size=-1")
    with pytest.raises(ValueError, match="rollout.streaming_min_new_frame"):
        tiny(tmp_path, "rollout.streaming_chunk_size=4", "rollout.streaming_min_new_frame=0")
    with pytest.raises(ValueError, match="rollout.fork_min/fork_max: no block"):
        tiny(tmp_path, "rollout.streaming_chunk_size=3", "rollout.streaming_min_new_frame=3",
             "rollout.perturb_within_first_x_chunks=1")


def test_wan_preset_is_the_released_config_value_for_value():
    config = load_config("wan1.3b")
    model, streaming, rollout, replay = config.model, config.streaming, config.rollout, config.replay
    objective, optim = config.objective, config.optim
    assert (model.lora_rank, model.lora_alpha, model.lora_dropout, model.lora_targets) == (256, 256.0, 0.0, None)
    assert model.gradient_checkpointing and list(streaming.timesteps) == [1000, 750, 500, 250]
    assert (streaming.frames_per_block, streaming.sink_frames, streaming.window_frames, streaming.nearest_frames,
            streaming.cache_frames, streaming.shift) == (3, 3, 12, 4, 33, 5.0)
    assert (streaming.context_noise, streaming.context_noise_grid) == (0, True)  # released: add_noise(x0, eps, 0)
    assert rollout.num_blocks * streaming.frames_per_block == 147 and config.num_routed() == 5
    assert (rollout.streaming_chunk_size, rollout.streaming_min_new_frame,
            rollout.perturb_within_first_x_chunks) == (21, 18, 7)
    assert (rollout.perturbed_blocks, rollout.num_branches, rollout.groups_per_step) == (5, 8, 8)
    assert (replay.grad_steps, replay.energy_space, replay.energy_scale) == (2, "x0", 1.0)
    assert (objective.beta, objective.clip_low, objective.clip_high, objective.advantage_clamp,
            objective.local_weight, objective.global_weight) == (10.0, 0.1, 0.2, 2.5, 1.0, 0.5)
    assert (optim.lr, optim.weight_decay, optim.warmup_steps, optim.grad_clip, optim.ema_decay,
            optim.updates_per_rollout, optim.old_sync_every) == (1e-5, 0.01, 5, 1.0, 0.999, 1, 2)
    assert (config.run.seed, config.run.steps) == (42, 3000)
    # The tiny preset differs only in geometry (and the LoRA, which needs a real model): same formulas/defaults.
    assert PRESETS["tiny"] == {}
    tiny_config = load_config("tiny")
    assert (tiny_config.objective, tiny_config.optim.weight_decay, tiny_config.optim.warmup_steps,
            tiny_config.optim.old_sync_every, tiny_config.replay.energy_space) == (objective, 0.01, 5, 2, "x0")


def test_wan_preset_builds_on_the_meta_device():
    """Shapes, parameter count, LoRA r256 parameter count on every Linear of every block, and the KV cache size of
    one sequence, without a GPU and without allocating the weights."""
    from kvpo_kernels.trainer.model import random_transformer

    config = load_config("wan1.3b")
    with torch.device("meta"):
        model = random_transformer(config)
    assert all(p.is_meta for p in model.parameters())
    assert len(model.blocks) == 30 and model.config.in_channels == 16
    total = sum(p.numel() for p in model.parameters())
    assert total == 1_418_996_800, total  # Wan2.1-T2V-1.3B
    linears = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(config.model.lora_rank * (m.in_features + m.out_features) for m in linears)
    assert len(linears) == 30 * 10 and lora == 30 * 256 * (8 * 2 * 1536 + 2 * (1536 + 8960)), lora
    frame_tokens = (config.rollout.latent_height // 2) * (config.rollout.latent_width // 2)
    cache = GroupKVCache(30, frame_tokens, 12, 128, frames_per_block=3, sink_frames=3, window_frames=12,
                         nearest_frames=4, cache_frames=33, dtype=torch.bfloat16, device="meta")
    assert frame_tokens == 1560 and cache._pool.block_bytes == 30 * 2 * 1560 * 12 * 128 * 2  # 287.5 MB per frame
    print(f"wan1.3b: {total / 1e9:.3f} B parameters, LoRA r256 {lora / 1e6:.1f} M, KV cache of one sequence "
          f"{33 * cache._pool.block_bytes / 2**30:.2f} GiB (33 frames)")


# ------------------------------------------------------------------------------- item 5: old policy window, warmup
def test_lr_warmup_steps_once_per_old_policy_window():
    optim = load_config("tiny").optim
    assert [optim.lr_at(window) / optim.lr for window in range(7)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1, 1])


def test_two_rollouts_share_one_old_policy_and_the_ratio_acts(tmp_path):
    """Released gradient_accumulation_steps 2: an optimizer step per rollout, the old policy synced every second
    rollout. So the second rollout of each window is off-policy: its ratios leave 1 (and are logged)."""
    records = Trainer(tiny(tmp_path, "optim.warmup_steps=0", "run.resume=false")).train(steps=4)
    assert [r["old_is_policy"] for r in records] == [True, False, True, False]
    for record in records:
        spread = record["ratio_max"] - record["ratio_min"]
        assert (spread == 0.0) if record["old_is_policy"] else (spread > 1e-6), record
    warm = Trainer(tiny(tmp_path / "warm", "run.resume=false")).train(steps=4)
    assert [r["lr"] for r in warm] == [0.0, 0.0, 2e-4, 2e-4]
