"""The released replay context, policy window, multi-prompt rollout and reward windows, on the tiny trainer model.

Released (Richard-Zhang-AI/KVPO, models/longlive/trainer/kvpo.py): ``_compute_trajectory_log_prob`` replays the
recorded blocks of the perturbed chunk from ``kv_state_before_fork`` and, between blocks, commits the replaying
generator's own last-step prediction ``gen_pred`` with ``context_noise``; ``_resolve_policy_window_frames`` and
``_build_global_segment_clip_specs`` / ``_latent_to_pixel_frame`` set the windows transcribed below.
"""
import dataclasses

import pytest
import torch

from kvpo_kernels import velocity_energy
from kvpo_kernels.trainer.config import load_config
from kvpo_kernels.trainer.loop import Trainer
from kvpo_kernels.trainer.rollout import (PromptEntry, align_switch_frames, chunk_layout, global_reward_clips,
                                          group_rewards, group_rollout, latent_clip, parse_prompt_line,
                                          policy_window, prompt_entries_from_lines, replay_energies)

from _trainer_setup import FAST, one_thread  # noqa: F401  (autouse fixture)


def _trainer(tmp_path, *overrides):
    return Trainer(load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}"] + list(overrides)))


def _rollout(gen, trainer, seed, **kwargs):
    prompt = kwargs.pop("prompt", trainer.prompts[:1])
    args = dict(prompt_id=0, num_blocks=8, fork_block=5, perturbed_blocks=1, num_branches=3, num_routed=2,
                latent_shape=trainer.latent_shape, rng=torch.Generator().manual_seed(seed))
    args.update(kwargs)
    return group_rollout(gen, prompt, **args)


def _manual_energies(gen, ro, num_blocks, own_context):
    """The replay by hand through the generator's public API: each block's history for the next is the policy's
    own last-step x0 (own_context) or the rollout's clean block (what the replay did before). Unweighted: the mean
    squared x0 residual ``[G, NB, K]`` (the replay's per-step weighting is pinned elsewhere)."""
    G, steps, f = ro.num_branches, ro.sigmas.numel(), gen.config.frames_per_block
    cache, prompt = ro.prefix_cache.fork(G), ro.prompt_embeds[0].expand(G, -1, -1)
    out = []
    with torch.no_grad():
        for i in range(num_blocks):
            preds = torch.stack([gen.predict_x0(cache, ro.fork_block + i, ro.x_t[i, k, :G], ro.sigmas[k], prompt)
                                 for k in range(steps)], dim=1)
            target = ro.x0_pred[i, :, :G].transpose(0, 1)
            out.append(velocity_energy(preds, target, backend="torch"))
            context = preds[:, -1] if own_context else ro.chunk[:G, :, i * f:(i + 1) * f]
            noise = None if ro.commit_noise is None else ro.commit_noise[i].expand(G, -1, -1, -1, -1)
            gen.commit_block(cache, ro.fork_block + i, context, prompt, commit_noise=noise)
    return torch.stack(out, dim=1)


def test_replay_context_is_the_policys_own_committed_x0(tmp_path):
    trainer = _trainer(tmp_path)
    ro = _rollout(trainer.generator, trainer, 11)
    with torch.no_grad():  # the policy moves away from the rollout policy
        for param in trainer.trainable:
            param.add_(0.02 * torch.randn_like(param))
    energy = replay_energies(trainer.generator, ro, num_blocks=3, grad_steps=2, backend="torch")
    own = _manual_energies(trainer.generator, ro, 3, own_context=True)
    rollout_context = _manual_energies(trainer.generator, ro, 3, own_context=False)
    # The replay's energy is a per-step weight times the x0 residual: the same weight for every branch and block.
    step_weight = (energy.detach() / own)[:1, :1]
    torch.testing.assert_close(energy.detach(), own * step_weight, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(own[:, 0], rollout_context[:, 0], rtol=1e-6, atol=0)
    # Later blocks see a different history than with the rollout's clean blocks: the test can tell them apart.
    assert ((own[:, 1:] - rollout_context[:, 1:]).abs() > 1e-4 * rollout_context[:, 1:].abs()).any()


@pytest.mark.parametrize("context_noise, grid", [(0, False), (50, False), (0, True)])
def test_rollout_policy_replaying_an_unrouted_trajectory_reproduces_it(tmp_path, context_noise, grid):
    """Policy == rollout policy, routing off (the anchor's trajectory as branch 0): E = 0 in every block and step,
    also with a noised commit (the replay reuses the rollout's commit noise), the released grid's at 0 included."""
    trainer = _trainer(tmp_path, f"streaming.context_noise={context_noise}", f"streaming.context_noise_grid={grid}")
    ro = _rollout(trainer.generator, trainer, 12)
    assert (ro.commit_noise is None) == (context_noise == 0 and not grid)
    order = [3, 0, 1, 2]
    swapped = dataclasses.replace(ro, chunk=ro.chunk[order], x_t=ro.x_t[:, :, order], x0_pred=ro.x0_pred[:, :, order])
    energy = replay_energies(trainer.generator, swapped, num_blocks=3, grad_steps=2, backend="torch")
    assert energy[0].abs().max() < 1e-9 * energy[1:, 0].abs().max() + 1e-12
    assert (energy[1:, 0] > 0).all()


def test_policy_window_released_numbers():
    chunks = chunk_layout(147, 21, 18)
    assert chunks[:3] == [(0, 21), (21, 39), (39, 57)] and chunks[-1] == (129, 147) and len(chunks) == 8
    # policy_window_frames 0 (auto): the fork block to the end of the perturbed chunk; P = 5 -> 5 or 6 blocks.
    assert policy_window(21, 5, chunks, 3, 147) == 6
    assert policy_window(24, 5, chunks, 3, 147) == 5
    assert policy_window(39, 5, chunks, 3, 147) == 6
    # N > 0: N frames rounded up to blocks, at least the P perturbed blocks, at most to the end of the video.
    assert policy_window(21, 5, chunks, 3, 147, policy_window_frames=7) == 5
    assert policy_window(21, 2, chunks, 3, 147, policy_window_frames=7) == 3
    assert policy_window(141, 1, chunks, 3, 147, policy_window_frames=30) == 2
    assert chunk_layout(8, 0, 0) == [(0, 8)]


def test_rollout_records_the_window_and_trainer_replays_it(tmp_path):
    trainer = _trainer(tmp_path)                       # tiny chunks [0, 5), [5, 7), [7, 8)
    assert trainer.chunks == [(0, 5), (5, 7), (7, 8)]
    ro = _rollout(trainer.generator, trainer, 13, chunks=trainer.chunks)
    assert ro.perturbed_chunk == (5, 7) and ro.window_blocks == 2
    assert trainer._replay(ro, grad=False).shape == (3, 2, 4)
    ro6 = _rollout(trainer.generator, trainer, 13, chunks=trainer.chunks, fork_block=6)
    assert ro6.perturbed_chunk == (5, 7) and ro6.window_blocks == 1
    # fork 6 + 2 blocks would leave [5, 7): only fork 5 is eligible (the released plan_perturbation filter)
    assert load_config("tiny", overrides=["rollout.perturbed_blocks=2"]).fork_blocks() == [5]
    with pytest.raises(ValueError, match="inside one chunk"):   # 3 blocks fit in no chunk
        load_config("tiny", overrides=["rollout.fork_max=5", "rollout.perturbed_blocks=3"])
    with pytest.raises(ValueError, match="streaming_chunk_size"):
        load_config("tiny", overrides=["rollout.streaming_chunk_size=-1"])


def _released_clip_specs(num_latent, switch_frames, clip_len, stride):
    """Transcription of the released _build_global_segment_clip_specs (pixel [start, end) per kept segment)."""
    def to_pixel(latent):
        return 0 if latent <= 0 else latent * stride - (stride - 1)
    full = to_pixel(num_latent)  # the decoded video's length: 1 + stride * (F - 1)
    boundaries = [0] + [p for p in map(to_pixel, switch_frames) if 0 < p < full] + [full]
    specs = []
    for i in range(len(boundaries) - 1):
        lo, hi = boundaries[i], boundaries[i + 1]
        if hi - lo < 2:
            continue
        start = max(0, (lo + hi) // 2 - clip_len // 2)
        end = start + clip_len
        if end > full:
            end, start = full, max(0, full - clip_len)
        specs.append((i, start, end))
    return specs


@pytest.mark.parametrize("frames,switches", [(147, [39, 75, 111]), (8, []), (21, [3]), (40, [1, 2, 30])])
def test_global_reward_clips_match_the_released_pixel_clips(frames, switches):
    clips = global_reward_clips(frames, switches, 36, 4)
    specs = _released_clip_specs(frames, switches, 36, 4)
    assert [c[0] for c in clips] == [s[0] for s in specs]
    for (_, a, b), (_, start, end) in zip(clips, specs):
        # The latent frames [a, b) are the fewest that decode to pixels [start, end).
        first_pixel = 0 if a == 0 else 4 * a - 3
        assert first_pixel <= start and end - 1 <= 4 * (b - 1) and b <= frames
        assert (a == 0 or 4 * (a + 1) - 3 > start) and 4 * (b - 2) < end - 1
    if frames == 147:
        assert clips == [(0, 15, 25), (1, 52, 62), (2, 88, 98), (3, 124, 134)]  # pixels 58:94, 207:243, ..
    assert latent_clip(0, 1, 4) == (0, 1) and latent_clip(1, 5, 4) == (1, 2) and latent_clip(0, 29, 4) == (0, 8)


class _Recorder:
    names = ("mean",)

    def __init__(self):
        self.calls = []

    def __call__(self, latents, prompt_ids):
        self.calls.append((latents.clone(), prompt_ids.clone()))
        return latents.mean(dim=(1, 2, 3, 4)).unsqueeze(1)


def test_multi_prompt_rollout_and_its_reward_windows(tmp_path):
    """Two segments switching at frame 7 (after the fork): the anchor equals a batch-1 generation that re-caches
    at the switch; the local reward sees the perturbed chunk with the fork's segment, the global one a clip per
    segment with its id, averaged."""
    trainer = _trainer(tmp_path)
    gen, prompts = trainer.generator, [trainer.prompts[1:2], trainer.prompts[3:4]]
    ro = _rollout(gen, trainer, 14, prompt=prompts, segment_ids=[1, 3], switch_frames=[7], chunks=trainer.chunks)
    C, H, W = trainer.latent_shape
    rng = torch.Generator().manual_seed(14)
    noises = [[torch.randn(1, C, 1, H, W, generator=rng) for _ in range(4)] for _ in range(8)]
    cache, blocks = gen.new_cache(1), []
    for b, n in enumerate(noises):
        if b == 7:
            gen.recache(cache, torch.cat(blocks, dim=2), prompts[1])
        blocks.append(gen.generate_block(cache, b, n[0], prompts[b >= 7], step_noise=n[1:]).x0)
    torch.testing.assert_close(ro.video()[-1:], torch.cat(blocks, dim=2), rtol=1e-5, atol=1e-5)
    single = _rollout(gen, trainer, 14, prompt=prompts[:1], segment_ids=[1], chunks=trainer.chunks)
    torch.testing.assert_close(ro.video()[:, :, :7], single.video()[:, :, :7], rtol=0, atol=0)
    assert not torch.allclose(ro.video()[:, :, 7:], single.video()[:, :, 7:])

    reward = _Recorder()
    local, global_ = group_rewards(reward, ro, clip_len=12, stride=4)
    (local_latents, local_ids), *clip_calls = reward.calls
    assert torch.equal(local_latents, ro.video()[:, :, 5:7]) and local_ids.tolist() == [1] * 4
    clips = global_reward_clips(8, [7], 12, 4)
    assert [ids.tolist() for _, ids in clip_calls] == [[1] * 4, [3] * 4] and len(clips) == 2
    for (latents, _), (_, a, b) in zip(clip_calls, clips):
        assert torch.equal(latents, ro.video()[:, :, a:b])
    expected = torch.stack([latents.double().mean(dim=(1, 2, 3, 4)) for latents, _ in clip_calls]).mean(0)
    torch.testing.assert_close(global_[:, 0], expected)
    assert local.shape == global_.shape == (4, 1)
    with pytest.raises(ValueError, match="policy window"):
        _rollout(gen, trainer, 14, prompt=prompts, segment_ids=[1, 3], switch_frames=[6], chunks=trainer.chunks)


def test_trainer_trains_on_multi_prompt_entries(tmp_path):
    trainer = Trainer(load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}",
                                                            "optim.updates_per_rollout=1"]),
                      prompt_entries=[PromptEntry((0, 2), (6,)), PromptEntry((1,))])
    assert trainer.prompt_entries[0].switch_frames == (7,)   # aligned to the chunk start 7
    record = trainer.train_step()
    assert not record["skipped"]
    with pytest.raises(ValueError, match="segment ids"):
        Trainer(trainer.config, prompt_entries=[PromptEntry((0, 9), (7,))])


def test_prompt_line_format_and_alignment():
    assert parse_prompt_line("a red fox || 39 || the lake || 75 || the moon") == (
        ["a red fox", "the lake", "the moon"], [39, 75])
    assert parse_prompt_line("  one prompt  ") == (["one prompt"], [])
    for bad in ("a || 39", "a || x || b", "a || 40 || b || 40 || c", "|| 3 || b", "a || 0 || b"):
        with pytest.raises(ValueError, match="prompt line"):
            parse_prompt_line(bad)
    chunks = chunk_layout(147, 21, 18)
    assert align_switch_frames([39, 75, 111], chunks) == [39, 75, 111]
    assert align_switch_frames([30, 60], chunks) == [39, 75]
    with pytest.raises(ValueError, match="not increasing"):
        align_switch_frames([40, 50], chunks)
    with pytest.raises(ValueError):
        PromptEntry((0, 1))


def test_rollout_segment_errors(tmp_path):
    trainer = _trainer(tmp_path)
    two = [trainer.prompts[:1], trainer.prompts[1:2]]
    for kwargs, match in ((dict(switch_frames=[7]), "segment_ids"), (dict(segment_ids=[0, 1]), "switch_frames"),
                          (dict(segment_ids=[0, 1], switch_frames=[8]), "switch_frames")):
        with pytest.raises(ValueError, match=match):
            _rollout(trainer.generator, trainer, 1, prompt=two, **kwargs)


def test_prompt_entries_from_lines():
    texts, entries = prompt_entries_from_lines(["a fox || 39 || a lake", "", "a lake", "the moon || 75 || a fox"])
    assert texts == ["a fox", "a lake", "the moon"]
    assert entries == [PromptEntry((0, 1), (39,)), PromptEntry((1,)), PromptEntry((2, 0), (75,))]
    with pytest.raises(ValueError, match="blank"):
        prompt_entries_from_lines(["  ", ""])


def test_multi_prompt_rollout_and_replay_never_grow_the_kv_pool(tmp_path, monkeypatch):
    """Re-encodes allocate before they free: the rollout reserves that room too (a growth copies the pool)."""
    from kvpo_kernels.cache import _BlockPool

    trainer = _trainer(tmp_path)
    grows, real_grow = [], _BlockPool.grow
    monkeypatch.setattr(_BlockPool, "grow", lambda pool, extra: (grows.append(extra), real_grow(pool, extra))[1])
    prompts = [trainer.prompts[i:i + 1] for i in range(3)]
    ro = _rollout(trainer.generator, trainer, 15, prompt=prompts, segment_ids=[0, 1, 2], switch_frames=[3, 7],
                  chunks=trainer.chunks)
    replay_energies(trainer.generator, ro, grad_steps=1)
    assert len(grows) == 1, f"the pool grew after it was made: {grows}"


def test_long_rollout_pool_follows_eviction_and_never_grows(tmp_path, monkeypatch):
    """The pool is sized for what is resident at the peak, not for every block the G + 1 sequences write: after
    the fork each sequence keeps at most cache_frames - sink_frames private frames (evicted blocks are reused).
    20 blocks forked at 5 (tiny: cache 8, sink 1): 8 + 4 * 7 = 36 blocks, where all writes would be 8 + 4 * 15."""
    from kvpo_kernels.cache import _BlockPool

    trainer = _trainer(tmp_path)
    grows, real_grow = [], _BlockPool.grow
    monkeypatch.setattr(_BlockPool, "grow", lambda pool, extra: (grows.append(extra), real_grow(pool, extra))[1])
    ro = _rollout(trainer.generator, trainer, 3, num_blocks=20, chunks=chunk_layout(20, 5, 2))
    energies = replay_energies(trainer.generator, ro, grad_steps=1)
    assert len(grows) == 1, f"the pool grew after it was made: {grows}"
    assert ro.prefix_cache._pool.num_blocks == 36 and torch.isfinite(energies).all()
