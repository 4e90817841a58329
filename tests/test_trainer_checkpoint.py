"""Checkpoints: resuming gives exactly the uninterrupted run's next step; writes are atomic and checksummed, the
newest two are kept, leftovers of a killed save are removed; a non-finite step is skipped, logged and leaves the
training state as before it; metrics.jsonl matches the checkpoint; config changes on resume are refused or applied."""
import json
import os
import random

import numpy as np
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


def _adam_state(trainer):
    return [value.clone() for state in trainer.optimizer.state.values() for value in state.values()]


def _step_rows(directory):
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "step" in row]


def test_resume_gives_the_same_next_step_loss(tmp_path):
    straight = Trainer(tiny(tmp_path / "a")).train(steps=4)

    Trainer(tiny(tmp_path / "b")).train(steps=3)  # writes checkpoint-00000003.pt at the end
    resumed = Trainer(tiny(tmp_path / "b"))
    resumed.transformer.proj_out.bias.data.add_(1.0)  # resume must overwrite whatever the fresh object holds
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


def test_training_never_touches_the_global_rngs(tmp_path):
    """Every random number comes from the trainer's own seeded generators, so checkpoints hold no global RNG
    state (and a resume cannot depend on one)."""
    states = lambda: (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: E731
    before = states()
    trainer = Trainer(tiny(tmp_path))
    trainer.train(steps=2)
    Trainer(tiny(tmp_path)).train(steps=3)  # resumed
    after = states()
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]
    assert "rng" not in trainer.state_dict()


def test_resume_loads_on_cpu(tmp_path, monkeypatch):
    """On a GPU, a checkpoint loaded with map_location=cuda would hold a second copy of the training state in GPU
    memory: resume loads on the CPU."""
    trainer = Trainer(tiny(tmp_path))
    trainer.save()
    seen = []
    real_load = ckpt.load_checkpoint

    def load(path, map_location="cpu", previous=None):
        seen.append(map_location)
        return real_load(path, map_location, previous)

    monkeypatch.setattr("kvpo_kernels.trainer.loop.load_checkpoint", load)
    trainer.device = torch.device("cuda", 0)  # only its name reaches the load; nothing runs on it
    assert trainer.resume() and seen == ["cpu"]


def test_checkpoint_write_is_atomic_and_leftovers_are_removed(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-00000001.pt")
    ckpt.save_checkpoint(path, {"step": 1, "w": torch.randn(3)})
    before = (tmp_path / "checkpoint-00000001.pt").read_bytes()

    def torn_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"step": 2})
    assert (tmp_path / "checkpoint-00000001.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000001.pt", "checkpoint-00000001.pt.sha256"]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    # What a SIGKILL mid-save leaves (no except clause runs): a temporary file, or a payload without its sidecar.
    (tmp_path / ".checkpoint-abc.tmp").write_bytes(b"x" * 100)
    (tmp_path / "checkpoint-00000002.pt").write_bytes(b"a whole payload")
    assert ckpt.list_checkpoints(str(tmp_path)) == [path]
    assert ckpt.remove_leftovers(str(tmp_path)) == [".checkpoint-abc.tmp", "checkpoint-00000002.pt"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000001.pt", "checkpoint-00000001.pt.sha256"]


def test_training_start_removes_leftovers_and_keeps_the_newest_two(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".checkpoint-x.tmp").write_bytes(b"torn")
    trainer = Trainer(tiny(tmp_path, "run.checkpoint_every=1"))
    trainer.train(steps=3)
    names = sorted(name for name in os.listdir(tmp_path) if "checkpoint" in name)
    assert names == ["checkpoint-00000002.pt", "checkpoint-00000002.pt.sha256", "checkpoint-00000003.pt",
                     "checkpoint-00000003.pt.sha256"]
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert start["removed_leftovers"] == [".checkpoint-x.tmp"]


@pytest.mark.parametrize("damage", ["flipped bytes", "random bytes", "empty", "no sidecar"])
def test_corrupt_checkpoint_is_refused_naming_the_file_and_the_way_out(tmp_path, damage):
    trainer = Trainer(tiny(tmp_path, "run.checkpoint_every=1"))
    trainer.train(steps=2)
    newest, previous = str(tmp_path / "checkpoint-00000002.pt"), str(tmp_path / "checkpoint-00000001.pt")
    data = bytearray(open(newest, "rb").read())
    if damage == "flipped bytes":  # 64 bytes inside tensor data: torch.load alone would not notice
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    elif damage == "random bytes":
        data = bytearray(torch.randint(0, 256, (len(data),), dtype=torch.uint8).numpy().tobytes())
    elif damage == "empty":
        data = bytearray()
    else:
        os.remove(newest + ".sha256")
        # without its sidecar the newest is an unfinished save (removed at start): the previous one resumes
        fresh = Trainer(tiny(tmp_path))
        fresh.train(steps=2)
        assert fresh.resumed_from == previous and ckpt.list_checkpoints(str(tmp_path)) == [previous, newest]
        os.remove(previous + ".sha256")
        with pytest.raises(ValueError, match=f"checkpoint {previous}: no checksum file .*--fresh"):
            ckpt.load_checkpoint(previous)
        return
    open(newest, "wb").write(bytes(data))
    with pytest.raises(ValueError) as error:
        Trainer(tiny(tmp_path)).train(steps=3)
    message = str(error.value)
    assert message.startswith(f"checkpoint {newest}: corrupt") and previous in message and "--fresh" in message
    assert "\n" not in message


class PoisonableReward(BrightnessReward):
    """Brightness, but NaN for every sample while `poison` is set."""

    def __init__(self, channels):
        super().__init__(channels)
        self.poison = False

    def __call__(self, latents, prompt_ids):
        out = super().__call__(latents, prompt_ids)
        return out * float("nan") if self.poison else out


@pytest.mark.parametrize("where", ["reward", "gradient"])
def test_nonfinite_step_is_skipped_and_leaves_the_state(tmp_path, where):
    config = tiny(tmp_path, "run.checkpoint_every=1")
    reward = PoisonableReward(config.model.latent_channels)
    trainer = Trainer(config, reward_fn=reward)
    trainer.train(steps=2)
    weights, adam, ema, version = _weights(trainer), _adam_state(trainer), [e.clone() for e in trainer.ema], \
        trainer.version

    handle = None
    if where == "reward":
        reward.poison = True
    else:
        handle = trainer.transformer.proj_out.weight.register_hook(lambda g: g * float("inf"))
    record = trainer.train(steps=3)[-1]
    reward.poison = False
    if handle is not None:
        handle.remove()

    reason = "non-finite reward (reward_fn returned NaN / inf)" if where == "reward" else "non-finite gradient"
    assert record["skipped"] and record["skip_reason"] == reason
    for before, after in zip(weights, _weights(trainer)):
        assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(adam, _adam_state(trainer)))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.ema)) and trainer.version == version
    assert _step_rows(tmp_path)[-1]["step"] == 3 and _step_rows(tmp_path)[-1]["skipped"] is True
    # The skipped step's checkpoint is the state before it, with the step counted (its rollout was consumed).
    state = ckpt.load_checkpoint(str(tmp_path / "checkpoint-00000003.pt"))
    assert state["step"] == 3 and state["version"] == version
    assert all(torch.equal(a, b) for a, b in zip(weights, state["model"].values()))

    # Training goes on normally afterwards and the next checkpoint is a clean one.
    record = trainer.train(steps=4)[-1]
    assert not record["skipped"]
    state = ckpt.load_checkpoint(str(tmp_path / "checkpoint-00000004.pt"))
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nonfinite_last_step_keeps_the_run(tmp_path):
    """Issue 9 case 1: with checkpoint_every=0, a NaN reward on the last step used to discard the whole run."""
    config = tiny(tmp_path, "run.checkpoint_every=0")
    reward = PoisonableReward(config.model.latent_channels)
    records = Trainer(config, reward_fn=reward).train(steps=2)
    reward.poison = True
    Trainer(config, reward_fn=reward).train(steps=3)
    assert ckpt.load_checkpoint(str(tmp_path / "checkpoint-00000003.pt"))["step"] == 3
    reward.poison = False
    assert Trainer(config, reward_fn=reward).train(steps=3) == []  # nothing redone
    rows = _step_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[1]["loss"] == records[1]["loss"]


def test_nonfinite_second_update_undoes_the_first(tmp_path):
    """Issue 9 case 2: with two updates per rollout and a huge lr, update 1 applies and update 2 is non-finite;
    the skipped step must leave the weights, AdamW state, EMA and version exactly as before it."""
    trainer = Trainer(tiny(tmp_path, "optim.updates_per_rollout=2", "optim.grad_clip=0"))
    trainer.train_step()  # AdamW and EMA hold state now
    for param_group in trainer.optimizer.param_groups:
        param_group["lr"] = 1e30
    weights, adam, ema, version = _weights(trainer), _adam_state(trainer), [e.clone() for e in trainer.ema], \
        trainer.version
    applied = []
    real_update = trainer._update
    trainer._update = lambda data: applied.append(trainer.version) or real_update(data)
    record = trainer.train_step()
    assert applied == [version, version + 1], "the first update did apply (the case under test)"
    assert record["skipped"] and "in update 2 of 2 (updates 1-1 undone)" in record["skip_reason"]
    assert trainer.version == version and trainer.step == 2
    assert all(torch.equal(a, b) for a, b in zip(weights, _weights(trainer)))
    assert len(adam) > 0 and all(torch.equal(a, b) for a, b in zip(adam, _adam_state(trainer)))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.ema))


def test_metrics_match_the_checkpoint_after_a_kill_between_row_and_save(tmp_path, monkeypatch):
    """Issue 9 case 4: the row of step 3 is written, then the process dies before checkpoint 3: on resume the file
    drops that row (and a torn line) and step 3 is redone once."""
    straight = Trainer(tiny(tmp_path / "a", "run.checkpoint_every=1")).train(steps=4)
    config = tiny(tmp_path / "b", "run.checkpoint_every=1")
    trainer = Trainer(config)
    trainer.train(steps=2)

    def killed(path=None):
        raise KeyboardInterrupt  # stands for SIGKILL after the row (the real kill: test_trainer_faults)

    trainer.save = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.train(steps=3)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as handle:
        handle.write('{"loss": 0.1, "ste')  # a row cut short
    Trainer(config).train(steps=4)
    rows = _step_rows(tmp_path / "b")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows] == [record["loss"] for record in straight]


def test_fresh_moves_the_earlier_run_aside(tmp_path):
    Trainer(tiny(tmp_path)).train(steps=2)
    Trainer(tiny(tmp_path, "run.resume=false")).train(steps=1)
    assert [row["step"] for row in _step_rows(tmp_path)] == [1]
    (aside,) = [name for name in os.listdir(tmp_path) if name.startswith("previous-")]
    assert sorted(os.listdir(tmp_path / aside)) == ["checkpoint-00000002.pt", "checkpoint-00000002.pt.sha256",
                                                   "config.yaml", "metrics.jsonl"]
    assert [row["step"] for row in _step_rows(tmp_path / aside)] == [1, 2]
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000001.pt")]


def test_resume_refuses_a_changed_setting_and_applies_it_with_the_override(tmp_path):
    Trainer(tiny(tmp_path)).train(steps=1)
    changed = tiny(tmp_path, "optim.lr=0.01", "objective.clip_high=0.3", "run.steps=5", "run.checkpoint_every=2")
    with pytest.raises(ValueError) as error:
        Trainer(changed).train(steps=2)
    message = str(error.value)
    assert "objective.clip_high: 0.2 -> 0.3" in message and "optim.lr: 0.001 -> 0.01" in message
    assert "run.steps" not in message and "run.checkpoint_every" not in message  # resumable settings
    assert "--allow-config-change" in message
    trainer = Trainer(changed, allow_config_change=True)
    record = trainer.train(steps=2)[-1]
    assert trainer.optimizer.param_groups[0]["lr"] == 0.01 and record["lr"] == 0.01
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (event,) = [row for row in rows if row.get("event") == "config_change"]
    assert event["at_step"] == 1 and event["changes"] == {"objective.clip_high": [0.2, 0.3], "optim.lr": [0.001, 0.01]}


@pytest.mark.parametrize("change", ["model.num_layers=1", "model.trainable=[proj_out]"])
def test_resume_refuses_another_geometry_or_trainable_set_even_with_the_override(tmp_path, change):
    Trainer(tiny(tmp_path)).train(steps=1)
    with pytest.raises(ValueError, match=f"resume from .*: the config differs.*{change.split('=')[0]}.*cannot change"):
        Trainer(tiny(tmp_path, change), allow_config_change=True).train(steps=2)


def test_bf16_model_trains_through_fp32_master_weights(tmp_path):
    """A step far below a bf16 ulp still moves the fp32 masters (a pure-bf16 AdamW would lose it); the model holds
    the masters rounded to bf16; the masters come back on resume."""
    config = tiny(tmp_path, "model.dtype=bfloat16", "optim.lr=1e-6")
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


def test_checkpoint_of_another_geometry_is_refused_for_a_passed_in_model(tmp_path):
    """With the same config but a model passed in from Python, the geometry check is the state's own shapes."""
    from kvpo_kernels.trainer.model import random_transformer

    Trainer(tiny(tmp_path, "optim.updates_per_rollout=1")).train(steps=1)
    other = random_transformer(tiny(tmp_path, "model.num_layers=1"))
    with pytest.raises(ValueError, match=r"^checkpoint .*checkpoint-00000001.pt: does not fit this model .*"
                                         r"model geometry and model.trainable must match"):
        Trainer(tiny(tmp_path, "optim.updates_per_rollout=1"), transformer=other).train(steps=2)
