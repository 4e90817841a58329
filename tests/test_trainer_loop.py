"""The trainer end to end on the tiny random Wan model (CPU): the reward rises, the rollout/replay are right,
the CLI and kvpo-plot produce their files, and the config loads from YAML."""
import dataclasses
import json
import os

import pytest
import torch

from kvpo_kernels.trainer import cli, plot
from kvpo_kernels.trainer.config import load_config
from kvpo_kernels.trainer.loop import Trainer
from kvpo_kernels.trainer.rollout import group_rollout, replay_energies

from _trainer_setup import FAST, one_thread  # noqa: F401  (autouse fixture)


def tiny(tmp_path, *overrides):
    return load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}"] + list(overrides))


def test_reward_rises_on_a_short_tiny_run(tmp_path):
    # Fixed seed. The rise is large, not a lucky wiggle: the mean of the last five steps beats the first five by
    # 0.33 with seed 0 (-0.34 -> -0.01) and by 0.21-0.41 with seeds 1, 2, 3, 6; the bar is 0.1.
    records = Trainer(tiny(tmp_path, "run.seed=0")).train(steps=30)
    rewards = [r["reward_mean"] for r in records]
    assert not any(r["skipped"] for r in records)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, f"reward did not rise: first five {rewards[:5]}, last five {rewards[-5:]}"


def test_rollout_shares_noise_and_anchor_is_unperturbed(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    gen, G = trainer.generator, 3
    rng = torch.Generator().manual_seed(7)
    prompt = trainer.prompts[:1]
    ro = group_rollout(gen, prompt, prompt_id=0, num_blocks=7, fork_block=5, perturbed_blocks=1, num_branches=G,
                       num_routed=2, latent_shape=trainer.latent_shape, rng=rng)
    C, H, W = trainer.latent_shape
    assert ro.chunk.shape == (G + 1, C, 2, H, W) and ro.prefix.shape == (1, C, 5, H, W)
    assert ro.x_t.shape == (2, 4, G + 1, C, 1, H, W) and ro.video().shape == (G + 1, C, 7, H, W)
    # Same initial noise for every sequence: only the routing differs.
    assert torch.equal(ro.x_t[0, 0], ro.x_t[0, 0, :1].expand_as(ro.x_t[0, 0]))
    assert len({tuple(r) for r in ro.routes}) > 1
    assert not torch.allclose(ro.chunk[0], ro.chunk[-1])
    # The anchor equals a plain batch-1 generation with the same noise (replayed from the generator's own API).
    rng = torch.Generator().manual_seed(7)
    noises = [[torch.randn(1, C, 1, H, W, generator=rng) for _ in range(4)] for _ in range(7)]
    cache = gen.new_cache(1)
    blocks = [gen.generate_block(cache, b, n[0], prompt, step_noise=n[1:]).x0 for b, n in enumerate(noises)]
    torch.testing.assert_close(ro.chunk[-1:], torch.cat(blocks[5:], dim=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ro.prefix, torch.cat(blocks[:5], dim=2), rtol=1e-5, atol=1e-5)


def test_rollout_and_replay_never_grow_the_kv_pool(tmp_path, monkeypatch):
    """The rollout sizes its pool up front: a doubling would copy the pool with old and new alive (tens of GB at
    the 1.3B geometry); the replays reuse the group's freed blocks."""
    from kvpo_kernels.cache import _BlockPool

    trainer = Trainer(tiny(tmp_path, "streaming.frames_per_block=2"))
    grows, real_grow = [], _BlockPool.grow
    monkeypatch.setattr(_BlockPool, "grow", lambda pool, extra: (grows.append(extra), real_grow(pool, extra))[1])
    ro = group_rollout(trainer.generator, trainer.prompts[:1], prompt_id=0, num_blocks=8, fork_block=5,
                       perturbed_blocks=1, num_branches=3, num_routed=2, latent_shape=trainer.latent_shape,
                       rng=torch.Generator().manual_seed(0))
    replay_energies(trainer.generator, ro, num_blocks=3, grad_steps=1)
    assert len(grows) == 1, f"the pool grew after it was made: {grows}"
    assert ro.prefix_cache._pool.num_blocks == grows[0] == trainer.generator.config.cache_frames + 4 * 2 * 3


def test_replay_energy_is_zero_on_an_unrouted_trajectory(tmp_path):
    """Replaying (routing off) the anchor's own trajectory reproduces its predictions: E = 0 in every block and step,
    while routed branches have E > 0. This checks the replay's cache, commits, x_t and targets line up."""
    trainer = Trainer(tiny(tmp_path))
    rng = torch.Generator().manual_seed(3)
    ro = group_rollout(trainer.generator, trainer.prompts[:1], prompt_id=0, num_blocks=8, fork_block=5,
                       perturbed_blocks=1, num_branches=3, num_routed=2, latent_shape=trainer.latent_shape, rng=rng)
    order = [3, 0, 1, 2]  # the anchor becomes branch 0
    swapped = dataclasses.replace(ro, chunk=ro.chunk[order], x_t=ro.x_t[:, :, order], x0_pred=ro.x0_pred[:, :, order])
    energy = replay_energies(trainer.generator, swapped, num_blocks=3, grad_steps=2, backend="torch")
    assert energy.shape == (3, 3, 4)
    assert energy[0].abs().max() < 1e-9 * energy[1:, 0].abs().max().clamp(min=1e-6) + 1e-12
    assert (energy[1:, 0] > 0).all()


def test_replay_gradients_flow_through_first_steps_only(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    ro = group_rollout(trainer.generator, trainer.prompts[:1], prompt_id=0, num_blocks=6, fork_block=5,
                       perturbed_blocks=1,
                       num_branches=2, num_routed=2, latent_shape=trainer.latent_shape,
                       rng=torch.Generator().manual_seed(1))
    energy = replay_energies(trainer.generator, ro, num_blocks=1, grad_steps=1, backend="torch")
    proj = trainer.transformer.proj_out.weight
    (first,) = torch.autograd.grad(energy[:, :, 0].sum(), proj, retain_graph=True)
    assert first.abs().sum() > 0
    (rest,) = torch.autograd.grad(energy[:, :, 1:].sum(), proj, allow_unused=True)
    assert rest is None or rest.abs().sum() == 0


def test_cli_writes_metrics_checkpoint_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--preset", "tiny", "--steps", "3", "--output-dir", str(out), "--set", "model.backend=torch",
                     "--set", "replay.energy_backend=torch", "--set", "run.progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "first reward" in printed and "last reward" in printed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "step" in line]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for key in ("reward_mean", "loss", "kl", "clip_fraction", "grad_norm"):
        assert all(isinstance(s[key], float) for s in steps), key
    assert (out / "checkpoint-00000003.pt").exists() and (out / "config.yaml").exists()
    assert (out / "metrics.png").stat().st_size > 10_000
    png = tmp_path / "curves.png"
    assert plot.main([str(out / "metrics.jsonl"), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Running again resumes at step 3 and has nothing left to do; more steps continue from the checkpoint.
    assert cli.main(["--preset", "tiny", "--steps", "4", "--output-dir", str(out), "--set", "model.backend=torch",
                     "--set", "replay.energy_backend=torch", "--set", "run.progress=false", "--set",
                     "run.plot=false"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "step" in line] == [1, 2, 3, 4]


def test_config_yaml_presets_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: wan1.3b\nrun: {steps: 7}\noptim: {lr: 3e-4, betas: [0.8, 0.9]}\n"
                    "rollout: {num_branches: 6}\n")
    config = load_config(path=str(path), overrides=["replay.grad_steps=3"])
    assert config.run.steps == 7 and config.optim.lr == 3e-4 and config.optim.betas == (0.8, 0.9)
    assert config.rollout.num_branches == 6 and config.replay.grad_steps == 3
    assert config.streaming.window_frames == 12 and config.num_routed() == 5  # from the preset
    path.write_text("optim: {learning_rate: 1}\n")
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config(path=str(path))
    with pytest.raises(ValueError, match="preset"):
        load_config("nope")
    with pytest.raises(ValueError, match="fork"):
        load_config("tiny", overrides=["rollout.fork_min=2"])
    with pytest.raises(ValueError, match="grad_steps"):
        load_config("tiny", overrides=["replay.grad_steps=9"])
    with pytest.raises(TypeError, match="number"):
        load_config("tiny", overrides=["optim.lr=fast"])
    assert os.path.basename(str(path)) == "run.yaml"


def test_rematerialized_replay_gives_the_same_gradient(tmp_path):
    """The two-pass replay (no-graph energies, then one (block, step) forward + backward at a time) must give the
    gradient of the one-graph replay."""
    grads = {}
    for remat in (False, True):
        trainer = Trainer(tiny(tmp_path / str(remat), f"replay.rematerialize={str(remat).lower()}",
                               "replay.blocks=chunk", "replay.grad_steps=3", "optim.updates_per_rollout=1",
                               "rollout.num_branches=3"))
        record = trainer.train_step()
        assert not record["skipped"]
        grads[remat] = [p.grad.clone() for p in trainer.trainable]
    assert sum(float(g.abs().sum()) for g in grads[False]) > 0
    for full, remat in zip(grads[False], grads[True]):
        torch.testing.assert_close(remat, full, rtol=1e-4, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_run_on_cuda(tmp_path, dtype):
    """The GPU path end to end: default kernel backends, gradient checkpointing and the two-pass replay."""
    config = load_config("tiny", overrides=["run.progress=false", "run.plot=false", f"run.output_dir={tmp_path}",
                                            "run.device=cuda", f"model.dtype={dtype}", "replay.blocks=chunk",
                                            "model.gradient_checkpointing=true", "replay.rematerialize=true"])
    trainer = Trainer(config)
    records = trainer.train(steps=3)
    assert not any(r["skipped"] for r in records)
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in records)
    assert trainer.transformer.proj_out.weight.device.type == "cuda"
    assert (tmp_path / "checkpoint-00000003.pt").exists()
    resumed = Trainer(config)  # optimizer state back from the checkpoint onto the GPU
    assert resumed.resume() and resumed.step == 3
    assert all(m.device.type == "cuda" for m in (resumed.master or resumed.trainable))
    assert all(value.device.type == "cuda" for state in resumed.optimizer.state.values()
               for key, value in state.items() if key != "step")
    assert all(torch.equal(a, b) for a, b in zip(resumed.trainable, trainer.trainable))


def test_step_rows_hold_exactly_the_metric_keys(tmp_path):
    from kvpo_kernels.trainer.metrics import STEP_KEYS

    record = Trainer(tiny(tmp_path, "optim.updates_per_rollout=1")).train(steps=1)[0]
    assert set(record) == set(STEP_KEYS) - {"skip_reason"}
    assert [key for key, _ in plot.PANELS] == ["reward_mean", "loss", "kl", "clip_fraction"]
