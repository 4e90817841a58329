"""Checkpoints: resuming gives exactly the uninterrupted run's next-step loss; writes are atomic; a non-finite loss
or gradient skips the step, is logged, and leaves the weights, the optimizer and the checkpoint untouched."""
import json
import os

import pytest
import torch

from kvpo_kernels.trainer import checkpoint as ckpt
from kvpo_kernels.trainer.config import load_config
from kvpo_kernels.trainer.loop import Trainer
from kvpo_kernels.trainer.rewards import BrightnessReward

from _trainer_setup import FAST, one_thread  # noqa: F401  (autouse fixture)


def tiny(out, *overrides):
    # EMA on and an old policy synced every 2 rollouts, so that every piece of state matters for the next step.
    return load_config("tiny", overrides=FAST + [f"run.output_dir={out}", "optim.ema_decay=0.9",
                                                 "optim.old_sync_every=2", "rollout.num_branches=3"] + list(overrides))


def _weights(trainer):
    return [p.detach().clone() for p in trainer.transformer.parameters()]


def test_resume_gives_the_same_next_step_loss(tmp_path):
    straight = Trainer(tiny(tmp_path / "a")).train(steps=4)

    Trainer(tiny(tmp_path / "b")).train(steps=3)  # writes checkpoint.pt at the end
    resumed = Trainer(tiny(tmp_path / "b"))
    resumed.transformer.proj_out.bias.data.add_(1.0)  # resume must overwrite whatever the fresh object holds
    torch.manual_seed(12345)  # and the global RNG state comes from the checkpoint
    after = resumed.train(steps=4)
    assert len(after) == 1 and after[0]["step"] == 4
    for key in ("loss", "policy_loss", "kl", "reward_mean", "grad_norm"):
        assert after[0][key] == straight[3][key], key  # bitwise: same data, same state
    reference = Trainer(tiny(tmp_path / "a"))
    reference.resume()
    for mine, theirs in zip(_weights(resumed), _weights(reference)):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(resumed.ema, reference.ema):
        assert torch.equal(mine, theirs)


def test_resume_loads_on_cpu_and_rng_states_go_back_as_cpu_tensors(tmp_path, monkeypatch):
    """On a GPU, a checkpoint loaded with map_location=cuda would hand torch.set_rng_state a CUDA byte tensor (it
    raises) and hold a second copy of the training state in GPU memory: resume loads on the CPU, and set_rng_state
    moves whatever it gets to the CPU."""
    trainer = Trainer(tiny(tmp_path))
    trainer.save()
    seen = []
    real_load = ckpt.load_checkpoint

    def load(path, map_location="cpu"):
        seen.append(map_location)
        return real_load(path, map_location)

    monkeypatch.setattr("kvpo_kernels.trainer.loop.load_checkpoint", load)
    trainer.device = torch.device("cuda", 0)  # only its name reaches the load; nothing runs on it
    assert trainer.resume() and seen == ["cpu"]

    class OnDevice:  # stands for a CUDA tensor: only .cpu() gives the real state
        def __init__(self, tensor):
            self.tensor = tensor

        def cpu(self):
            return self.tensor

    state = ckpt.rng_state()
    expected = torch.rand(3)
    cuda_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: cuda_states.extend(states))
    cuda_state = torch.zeros(16, dtype=torch.uint8)
    ckpt.set_rng_state(dict(state, torch=OnDevice(state["torch"]), cuda=[OnDevice(cuda_state)]))
    assert torch.equal(torch.rand(3), expected) and cuda_states == [cuda_state]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(str(path), {"step": 1, "w": torch.randn(3)})
    before = path.read_bytes()

    def torn_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(str(path), {"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert ckpt.load_checkpoint(str(path))["step"] == 1


class PoisonableReward(BrightnessReward):
    """Brightness, but NaN for every sample while `poison` is set."""

    def __init__(self, channels):
        super().__init__(channels)
        self.poison = False

    def __call__(self, latents, prompt_ids):
        out = super().__call__(latents, prompt_ids)
        return out * float("nan") if self.poison else out


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_and_checkpoint_untouched(tmp_path, where):
    config = tiny(tmp_path, "run.checkpoint_every=1")
    reward = PoisonableReward(config.model.latent_channels)
    trainer = Trainer(config, reward_fn=reward)
    trainer.train(steps=2)
    path = tmp_path / "checkpoint.pt"
    saved = path.read_bytes()
    weights = _weights(trainer)
    adam_steps = [float(s["step"]) for s in trainer.optimizer.state.values()]
    ema = [e.clone() for e in trainer.ema]

    handle = None
    if where == "loss":
        reward.poison = True
    else:
        handle = trainer.transformer.proj_out.weight.register_hook(lambda g: g * float("inf"))
    record = trainer.train(steps=3)[-1]
    reward.poison = False
    if handle is not None:
        handle.remove()

    assert record["skipped"] and record["skip_reason"] == f"non-finite {where}"
    assert path.read_bytes() == saved
    for before, after in zip(weights, _weights(trainer)):
        assert torch.equal(before, after)
    assert [float(s["step"]) for s in trainer.optimizer.state.values()] == adam_steps
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.ema))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 3 and logged[-1]["skipped"] is True

    # Training goes on normally afterwards and the next checkpoint is a clean one.
    record = trainer.train(steps=4)[-1]
    assert not record["skipped"] and path.read_bytes() != saved
    state = ckpt.load_checkpoint(str(path))
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_bf16_model_trains_through_fp32_master_weights(tmp_path):
    """A step far below a bf16 ulp still moves the fp32 masters (a pure-bf16 AdamW would lose it); the model holds
    the masters rounded to bf16; the masters come back on resume."""
    # (warmup 0: the recipe's warmup trains the first old-policy window at lr 0)
    config = tiny(tmp_path, "model.dtype=bfloat16", "optim.lr=1e-6", "optim.warmup_steps=0")
    trainer = Trainer(config)
    start = [m.detach().clone() for m in trainer.master]
    assert all(m.dtype == torch.float32 for m in trainer.master)
    # bf16 except the modules diffusers keeps in fp32 (as from_pretrained(torch_dtype=bf16) loads them); the RoPE
    # tables stay fp32 too.
    model = trainer.transformer
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and model.proj_out.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32 and model.rope.freqs_cos.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert sum(p.dtype == torch.bfloat16 for p in trainer.trainable) > len(trainer.trainable) // 2
    record = trainer.train(steps=2)[-1]
    assert not record["skipped"]
    assert any(not torch.equal(m, s) for m, s in zip(trainer.master, start))
    for param, master in zip(trainer.trainable, trainer.master):
        assert torch.equal(param, master.to(param.dtype))
    resumed = Trainer(config)
    assert resumed.resume()
    for mine, saved in zip(resumed.master, trainer.master):
        assert torch.equal(mine, saved)
