"""Wrong inputs (issue 9 "Unclear errors" and case 7): each is one line naming the config key, file or argument and
what is allowed, raised before the model is built; kvpo-train prints it without a traceback and exits 2."""
import dataclasses
import json

import pytest
import torch

from kvpo_kernels.trainer import cli, loop, plot
from kvpo_kernels.trainer.config import TrainConfig, load_config
from kvpo_kernels.trainer.loop import Trainer
from kvpo_kernels.trainer.rewards import BrightnessReward

from _trainer_setup import FAST, one_thread  # noqa: F401  (autouse fixture)

CONFIG_CASES = [  # (override, exception type, the message's start)
    ("run.steps=ten", TypeError, "run.steps: must be an integer, got 'ten'"),
    ("run.steps=2.5", TypeError, "run.steps: must be an integer, got 2.5"),
    ("run.steps=true", TypeError, "run.steps: must be an integer, got True"),
    ("rollout.num_branches='4'", TypeError, "rollout.num_branches: must be an integer, got '4'"),
    ("run.seed=abc", TypeError, "run.seed: must be an integer"),
    ("optim.lr=-1", ValueError, "optim.lr: must be > 0, got -1"),
    ("optim.lr=fast", TypeError, "optim.lr: must be a finite number, got 'fast'"),
    ("streaming.timesteps=1000", TypeError, "streaming.timesteps: must be a list of integers, got 1000"),
    ("streaming.timesteps=[1000,a,500,250]", TypeError, "streaming.timesteps: must be a list of integers"),
    ("streaming.timesteps=[1001,750,500,250]", ValueError, "streaming.timesteps: must be a non-empty list of "
                                                           "integers in (0, 1000]"),
    ("replay.step_weights=[1,2,x,4]", TypeError, "replay.step_weights: must be a list of finite numbers or null"),
    ("run.cpu_threads='2'", TypeError, "run.cpu_threads: must be an integer, got '2'"),
    ("run.cpu_threads=-3", ValueError, "run.cpu_threads: must be >= 0, got -3"),
    ("optim.betas=[0.9]", TypeError, "optim.betas: must be a list of 2 finite numbers, got (0.9,)"),
    ("reward.components=[{name: brightness, weight: heavy}]", TypeError,
     "reward.components[0].weight: must be a finite number, got 'heavy'"),
    ("run.device=tpu", ValueError, "run.device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("rollout.groups_per_step=0", ValueError, "rollout.groups_per_step: must be >= 1, got 0"),
    ("objective.clip_low=2.0", ValueError, "objective.clip_low: must be in [0, 1), got 2.0"),
    ("objective.clip_high=0", ValueError, "objective.clip_high: must be > 0"),
    ("replay.energy_scale=.nan", TypeError, "replay.energy_scale: must be a finite number, got nan"),
    ("optim.learning_rate=1", ValueError, "optim.learning_rate: unknown config key; known: ["),
    ("model.causal_checkpoint=''", ValueError, "model.causal_checkpoint: must be a checkpoint file (or null)"),
    ("model.dtype=fp8", ValueError, "model.dtype: must be one of float32, bfloat16, float16"),
    ("rollout.latent_height=7", ValueError, "rollout.latent_height: must be an even integer >= 2"),
    ("rollout", ValueError, "--set 'rollout': expected section.key=value"),
]


@pytest.mark.parametrize("override, kind, start", CONFIG_CASES, ids=[case[0] for case in CONFIG_CASES])
def test_config_errors_name_the_key(override, kind, start):
    with pytest.raises(kind) as error:
        load_config("tiny", overrides=[override])
    message = str(error.value)
    assert message.startswith(start) and "\n" not in message, message


def test_python_config_is_validated_before_the_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_transformer", lambda config: pytest.fail("model built before validation"))
    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}"])
    for section, key, value in (("run", "steps", 2.5), ("optim", "betas", (0.9,)), ("rollout", "groups_per_step", 0)):
        bad = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{key: value})})
        with pytest.raises((TypeError, ValueError), match=f"^{section}.{key}: "):
            Trainer(bad)
    assert TrainConfig().validate().optim.lr == 1e-3  # ints for floats are fine: load_config("optim.lr=1") too
    assert load_config("tiny", overrides=["optim.lr=1"]).optim.lr == 1


def _prompt_file(tmp_path, kind):
    path = tmp_path / "prompts.pt"
    if kind == "missing":
        return path
    if kind == "text file":
        path.write_text("a cat on a skateboard\n")
        return path
    value = {"dict": {"embeds": torch.randn(2, 4, 32)}, "list": [torch.randn(4, 32)],
             "0 prompts": torch.randn(0, 4, 32), "0 tokens": torch.randn(2, 0, 32),
             "wrong width": torch.randn(2, 4, 31),
             "nan": torch.full((2, 4, 32), float("nan"))}[kind]
    torch.save(value, path)
    return path


PROMPT_CASES = [("missing", "no such file"), ("text file", "not a torch file holding a tensor"),
                ("dict", "must hold a tensor [P, L, text_dim], got a dict"), ("list", "got a list"),
                ("0 prompts", "with P, L >= 1, got torch.float32 (0, 4, 32)"), ("0 tokens", "(2, 0, 32)"),
                ("wrong width", "embeddings must be 32 wide (the model's text_dim), got (2, 4, 31)"),
                ("nan", "holds non-finite values")]


@pytest.mark.parametrize("kind, expected", PROMPT_CASES, ids=[case[0] for case in PROMPT_CASES])
def test_prompts_file_errors_come_before_the_model_is_built(tmp_path, monkeypatch, kind, expected):
    monkeypatch.setattr(loop, "build_transformer", lambda config: pytest.fail("model built before the prompts check"))
    path = _prompt_file(tmp_path, kind)
    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}", f"rollout.prompts_file={path}"])
    with pytest.raises((ValueError, TypeError)) as error:
        Trainer(config)
    assert str(error.value).startswith(f"rollout.prompts_file {path}: ") and expected in str(error.value)


def test_missing_causal_checkpoint_names_the_config_key(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_transformer", lambda config: pytest.fail("model built before the check"))
    config = load_config("tiny", overrides=FAST + [f"model.causal_checkpoint={tmp_path}/none.pt"])
    with pytest.raises(ValueError, match=f"^model.causal_checkpoint: no checkpoint file {tmp_path}/none.pt$"):
        Trainer(config)


class NoNames:
    def __call__(self, latents, prompt_ids):
        return torch.zeros(latents.shape[0], 1)


class Shaped(BrightnessReward):
    def __init__(self, channels, result):
        super().__init__(channels)
        self.result = result

    def __call__(self, latents, prompt_ids):
        scores = super().__call__(latents, prompt_ids)
        return {"list": scores.tolist(), "rows": scores[:-1], "columns": scores.repeat(1, 2)}[self.result]


@pytest.mark.parametrize("result, kind, expected", [
    ("no names", TypeError, "reward_fn: must be callable(latents, prompt_ids) -> [N, len(names)] and have a .names"),
    ("list", TypeError, "reward_fn: must return a tensor [4, 1] (samples x names), got a list"),
    ("rows", ValueError, "reward_fn: must return [samples, len(names)] = [4, 1] (names=('brightness',)), got [3, 1]"),
    ("columns", ValueError, "= [4, 1] (names=('brightness',)), got [4, 2]"),
])
def test_reward_function_errors(tmp_path, result, kind, expected):
    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}", "rollout.num_branches=3"])
    reward = NoNames() if result == "no names" else Shaped(config.model.latent_channels, result)
    with pytest.raises(kind) as error:
        Trainer(config, reward_fn=reward).train_step()
    assert expected in str(error.value)


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "tiny", "--set", "optim.lr=-1"], "kvpo-train: error: optim.lr: must be > 0, got -1.0\n"),
    (["--preset", "tiny", "--set", "optim.learnig_rate=1"], "kvpo-train: error: optim.learnig_rate: unknown"),
    (["--config", "/nonexistent.yaml"], "kvpo-train: error: --config /nonexistent.yaml: cannot read the config file"),
    (["--preset", "tiny", "--set", "rollout.prompts_file=/nonexistent.pt"],
     "kvpo-train: error: rollout.prompts_file /nonexistent.pt: no such file\n"),
])
def test_cli_prints_one_line_and_exits_2(capsys, argv, expected):
    code, err = _cli(capsys, *argv)
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err


def test_cli_config_file_error_comes_before_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "build_transformer", lambda config: pytest.fail("model built before validation"))
    path = tmp_path / "run.yaml"
    path.write_text("run: {steps: ten}\n")
    code, err = _cli(capsys, "--config", str(path))
    assert code == 2 and err == "kvpo-train: error: run.steps: must be an integer, got 'ten'\n"


def test_cli_corrupt_checkpoint_exits_2_and_resume_message(tmp_path, capsys):
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path), *[f"--set={item}" for item in FAST],
            "--set=rollout.num_branches=3"]
    assert cli.main(argv + ["--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "first reward" in out and "(step 1)" in out and "(step 2)" in out
    assert cli.main(argv + ["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2 of 3" in out and "(step 3)" in out and "(step 1)" not in out
    (tmp_path / "checkpoint-00000003.pt").write_bytes(b"")
    code, err = _cli(capsys, *argv, "--steps", "4")
    assert code == 2 and err.startswith(f"kvpo-train: error: checkpoint {tmp_path}/checkpoint-00000003.pt: corrupt")
    assert "Traceback" not in err and err.count("\n") == 1


def test_plot_on_a_missing_file_and_never_backwards(tmp_path, capsys):
    assert plot.main([str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == f"kvpo-plot: error: {tmp_path}/none.jsonl: no such file\n"
    path = tmp_path / "metrics.jsonl"  # an old file where a second run was appended (steps 1..3, 1, 2)
    rows = [{"step": step, "loss": float(index)} for index, step in enumerate([1, 2, 3, 1, 2])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 3, "lo')
    records = plot.read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2, 3] and [r["loss"] for r in records] == [3.0, 4.0, 2.0]


def test_cli_config_change_on_resume_needs_the_flag(tmp_path, capsys):
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path), *[f"--set={item}" for item in FAST],
            "--set=rollout.num_branches=3", "--set=optim.updates_per_rollout=1"]
    assert cli.main(argv + ["--steps", "1"]) == 0
    code, err = _cli(capsys, *argv, "--steps", "2", "--set", "optim.lr=0.01")
    assert code == 2 and "optim.lr: 0.001 -> 0.01" in err and "--allow-config-change" in err and "Traceback" not in err
    assert cli.main(argv + ["--steps", "2", "--set", "optim.lr=0.01", "--allow-config-change"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows if "step" in row] == [0.001, 0.01]
    assert [row["changes"] for row in rows if row.get("event") == "config_change"] == [{"optim.lr": [0.001, 0.01]}]
