"""Fault injection (issue 9): a short tiny run SIGKILLed at several points - inside a checkpoint's payload write,
between the payload and its checksum sidecar, between a step's metrics row and its checkpoint, and in the middle of
a step - and resumed each time ends with the weights, optimizer state and metrics.jsonl rows of an uninterrupted
run, each step logged once, and no leftover temporary or unfinished files."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvpo_kernels.trainer import checkpoint as ckpt
from kvpo_kernels.trainer.config import load_config
from kvpo_kernels.trainer.loop import Trainer

from _trainer_setup import FAST, one_thread  # noqa: F401  (autouse fixture)

STEPS = 5
OVERRIDES = FAST + ["rollout.num_branches=3", "optim.ema_decay=0.9", "optim.old_sync_every=2",
                    "run.checkpoint_every=1", f"run.steps={STEPS}"]

# Runs in a child process: train, SIGKILLing itself at the point named by argv (`kind` at train step `step`).
CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from kvpo_kernels.trainer import checkpoint as ckpt
    from kvpo_kernels.trainer.config import load_config
    from kvpo_kernels.trainer.loop import Trainer

    out, kind, step, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    trainer = Trainer(load_config("tiny", overrides=overrides + [f"run.output_dir={out}"]))
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if kind == "payload":  # mid torch.save, a few KB into the payload of checkpoint `step`
        real_write, written = ckpt._HashingWriter.write, [0]
        def write(self, data):
            written[0] += len(data)
            if trainer.step == step and written[0] > 4096:
                die()
            return real_write(self, data)
        ckpt._HashingWriter.write = write
    elif kind == "sidecar":  # payload of checkpoint `step` in place, its sidecar half written
        real_atomic = ckpt._write_atomically
        def atomic(path, write):
            if trainer.step == step and path.endswith(".sha256"):
                real_atomic(path, lambda handle: (handle.write(b"0123"), handle.flush(), die()))
            return real_atomic(path, write)
        ckpt._write_atomically = atomic
    elif kind == "row":  # the row of step `step` written, its checkpoint not begun
        real_save = trainer.save
        trainer.save = lambda path=None: die() if trainer.step == step else real_save(path)
    elif kind == "step":  # inside step `step`, between its rollout and its update
        real_reward = trainer.reward_fn
        class Dying:
            names = real_reward.names
            def __call__(self, latents, prompt_ids):
                if trainer.step == step - 1:
                    die()
                return real_reward(latents, prompt_ids)
        trainer.reward_fn = Dying()
    trainer.train()
""")


def _rows(directory):
    rows = [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
    return [{key: value for key, value in row.items() if key != "time_s"} for row in rows if "step" in row]


def _tensors(state):
    model = list(state["model"].values())
    adam = [value for entry in state["optimizer"]["state"].values() for value in entry.values()]
    return model + adam + state["ema"] + state["old"] + state["ref"]


@pytest.mark.slow  # four child processes (~6 s of CPU each, mostly imports); CI runs it
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight = tmp_path / "straight"
    Trainer(load_config("tiny", overrides=OVERRIDES + [f"run.output_dir={straight}"])).train()

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for kind, step in (("payload", 2), ("sidecar", 3), ("row", 4), ("step", 5)):
        result = subprocess.run([sys.executable, "-c", CHILD, str(killed), kind, str(step), *OVERRIDES], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == -9, (kind, result.stderr[-2000:])
    Trainer(load_config("tiny", overrides=OVERRIDES + [f"run.output_dir={killed}"])).train()  # the last resume

    assert _rows(killed) == _rows(straight)  # each step once, the same values
    newest = ckpt.checkpoint_path(str(killed), STEPS)
    assert ckpt.list_checkpoints(str(killed)) == [ckpt.checkpoint_path(str(killed), STEPS - 1), newest]
    for mine, theirs in zip(_tensors(ckpt.load_checkpoint(newest)),
                            _tensors(ckpt.load_checkpoint(ckpt.checkpoint_path(str(straight), STEPS)))):
        assert torch.equal(mine, theirs)
    names = sorted(os.listdir(killed))
    assert names == ["checkpoint-00000004.pt", "checkpoint-00000004.pt.sha256", "checkpoint-00000005.pt",
                     "checkpoint-00000005.pt.sha256", "config.yaml", "metrics.jsonl"], names
    starts = [json.loads(line) for line in open(killed / "metrics.jsonl") if '"event": "start"' in line]
    assert [start["resumed_at"] for start in starts] == [None, 1, 2, 3, 4]
    assert starts[1]["removed_leftovers"] and starts[2]["removed_leftovers"]  # what the kills mid-save left
