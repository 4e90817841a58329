"""Trainer configuration: nested dataclasses, loadable from YAML, with named presets.

A YAML file mirrors the sections below; any field left out keeps its default, an unknown key is an error::

    preset: tiny            # optional: start from a preset, then apply the rest of the file on top
    run: {steps: 200, output_dir: runs/wan}
    model: {pretrained: /ckpt/Self-Forcing-Wan, num_layers: null}
    rollout: {num_branches: 8, num_routed: 5}

Every field is documented by the comment on its line.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from .errors import InputTypeError, InputValueError


@dataclass
class RunConfig:
    steps: int = 150                       # optimizer steps (each: one group rollout per group, then the update)
    seed: int = 0                          # seeds the model init, prompts, reward decoder and every rollout's noise
    output_dir: str = "runs/tiny"          # metrics.jsonl, config.yaml, checkpoint-<step>.pt, metrics.png go here
    device: str = "auto"                   # "auto" (cuda:LOCAL_RANK when available, else cpu), "cpu", "cuda", ...
    checkpoint_every: int = 0              # write a checkpoint every N steps and at the end (0: only at the end);
    #                                        the newest two are kept, each with a .sha256 checksum sidecar
    resume: bool = True                    # continue from the newest checkpoint in output_dir (false, --fresh:
    #                                        start over; an earlier run's files move to output_dir/previous-<time>/)
    progress: bool = True                  # tqdm progress bar (rank 0 only)
    plot: bool = True                      # write metrics.png at the end (rank 0 only)
    cpu_threads: int = 1                   # kvpo-train on CPU: torch intra-op threads (0: torch's default). Small
    #                                        models run fastest single-threaded; extra threads only add sync cost.
    #                                        Only 1 is bitwise reproducible: another count changes the CPU matmul
    #                                        summation order (the loss differs by ~1% at step 1 between 1 and 2)


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None       # diffusers WanTransformer3DModel path / hub id; None: random init (below)
    subfolder: Optional[str] = "transformer"  # subfolder of `pretrained` holding the transformer
    causal_checkpoint: Optional[str] = None  # Self-Forcing / LongLive generator weights (.pt / .safetensors, original
    #                                          Wan names) loaded into the model built from the fields below
    causal_checkpoint_key: Optional[str] = None  # sub-dict of that checkpoint (default: generator_ema, generator, ...)
    gradient_checkpointing: bool = False   # recompute each transformer block in backward (diffusers' switch)
    dtype: str = "float32"                 # parameter dtype: float32 | bfloat16 | float16
    num_layers: int = 2                    # random init only: transformer blocks
    num_attention_heads: int = 2           # random init only: attention heads
    attention_head_dim: int = 16           # random init only: head dim
    ffn_dim: int = 64                      # random init only: MLP hidden size
    text_dim: int = 32                     # random init only: prompt embedding size
    freq_dim: int = 32                     # random init only: timestep embedding size
    latent_channels: int = 4               # random init only: in/out channels (Wan VAE: 16)
    trainable: List[str] = field(default_factory=list)  # train only parameters whose name contains one of these
    backend: str = "auto"                  # kernel backend of the routed attention processor


@dataclass
class StreamingSection:
    frames_per_block: int = 1              # latent frames per block
    sink_frames: int = 1                   # first frames, always visible
    window_frames: int = 5                 # frames a block sees in total, incl. sink and itself
    nearest_frames: int = 2                # with routing: most recent frames incl. the current block
    timesteps: Tuple[int, ...] = (1000, 750, 500, 250)  # denoising timesteps of the few-step sampler
    shift: float = 5.0                     # sigma warp s' = shift*s / (1 + (shift-1)*s)
    cache_frames: int = 8                  # frames kept resident incl. the block being written (LongLive-KVPO: 21)
    context_noise: int = 0                 # timestep of the commit / re-cache forwards; input (1 - t/1000) x0 +
    #                                        t/1000 noise (released: 0; see StreamingConfig.context_noise)
    memory_bank_frames: int = 0            # MemFlow's KV memory bank, frames per layer (released bank_size: 3); 0: off
    bank_record_interval: int = 3          # MemFlow: one bank slot per this many blocks (released record_interval: 3)
    bank_rule: str = "rollout"             # MemFlow's released bank update: rollout | inference (see memflow.py)

    def route_pool_size(self, fork_block: int, perturbed_blocks: int) -> int:
        """Frames a route may use when forking at `fork_block` (GroupKVCache.route_pool's formula)."""
        f, start = self.frames_per_block, fork_block * self.frames_per_block
        first = max(self.sink_frames, start + (perturbed_blocks - 1) * f - (self.cache_frames - self.sink_frames - f))
        return max(0, start - (self.nearest_frames - f) - first)


@dataclass
class RolloutConfig:
    num_blocks: int = 8                    # blocks per video (the chunk ends with the video)
    fork_min: int = 5                      # earliest fork block (needs an eligible pool larger than num_routed)
    fork_max: int = 6                      # latest fork block (inclusive); drawn uniformly per group
    perturbed_blocks: int = 1              # P: blocks generated with routed KV after the fork
    num_branches: int = 4                  # G: routed branches per group (plus one unperturbed anchor)
    num_routed: Optional[int] = None       # older frames each branch routes in; None: window - sink - nearest
    sampler: str = "chr"                   # route sampler: chr (causal-history routing) | uniform
    groups_per_step: int = 1               # groups (prompts) per optimizer step, split across ranks
    latent_height: int = 8                 # latent grid height
    latent_width: int = 8                  # latent grid width
    num_prompts: int = 4                   # synthetic prompts (fixed random embeddings) when no prompt file is given
    prompt_length: int = 8                 # tokens per synthetic prompt embedding
    prompts_file: Optional[str] = None     # .pt file with precomputed text embeddings [P, L, text_dim] (e.g. UMT5)
    streaming_chunk_size: int = 5          # frames of the first streaming chunk (released 21; 0: one chunk, the video)
    streaming_min_new_frame: int = 2       # frames of every later chunk (released 18): the perturbed chunk is the one
    #                                        holding the fork; it sets the local reward and the policy window
    align_switch_to_chunk: bool = True     # move each prompt switch to the first chunk start at or after it


@dataclass
class ReplayConfig:
    grad_steps: int = 2                    # gradients flow through the first k denoising steps of each block only
    step_weights: Optional[List[float]] = None  # per-step energy weights [K]; None: all 1
    policy_window_frames: int = 0          # frames replayed from the fork block: 0 = auto (to the end of the perturbed
    #                                        chunk, released); N > 0: N rounded up to blocks, at least P blocks
    energy_scale: float = 100.0            # multiplies E (a mean over elements): sets how peaked pi_theta is
    energy_backend: str = "auto"           # kernel backend of velocity_energy (auto | cuda | triton | cpu | torch)
    rematerialize: bool = False            # two-pass replay: energies without graph, then one (block, step) forward
    #                                        + backward at a time with dLoss/dE; one forward's activations alive


@dataclass
class ObjectiveConfig:
    clip_low: float = 0.1                  # ratio clip: 1 - clip_low
    clip_high: float = 0.2                 # ratio clip: 1 + clip_high
    beta: float = 0.01                     # weight of KL(pi_theta || pi_ref) against the initial policy
    advantage_clamp: float = 2.5           # |A| <= this
    local_weight: float = 1.0              # weight of the perturbed chunk's reward signal
    global_weight: float = 0.5             # weight of the whole video's reward signal


@dataclass
class RewardConfig:
    components: List[Dict[str, Any]] = field(default_factory=lambda: [{"name": "brightness", "weight": 1.0}])
    # built-in reward entries: {name: brightness | smoothness, weight: float, ...constructor kwargs}
    long_reward_normal_clip_len: int = 36  # global reward: one clip of this many PIXEL frames per prompt segment
    vae_temporal_stride: int = 4           # pixel frames per latent frame (latent l >= 1 -> pixels 4l-3 .. 4l)


@dataclass
class OptimConfig:
    lr: float = 1e-3                       # AdamW learning rate
    weight_decay: float = 0.0              # AdamW weight decay
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0                 # clip the global gradient norm to this (0: off)
    ema_decay: float = 0.0                 # EMA of the trainable weights (0: off), kept in checkpoints
    updates_per_rollout: int = 2           # PPO epochs: updates on each rollout
    old_sync_every: int = 1                # copy the policy into the old (rollout) policy every N rollouts


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    streaming: StreamingSection = field(default_factory=StreamingSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def num_routed(self) -> int:
        s = self.streaming
        default = max(0, s.window_frames - s.sink_frames - s.nearest_frames)
        return default if self.rollout.num_routed is None else self.rollout.num_routed

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def _validate_chunks(self) -> None:
        """Released fork eligibility: the P perturbed blocks lie in the fork's streaming chunk."""
        from .rollout import chunk_layout

        r, f = self.rollout, self.streaming.frames_per_block
        for name in ("streaming_chunk_size", "streaming_min_new_frame"):
            if getattr(r, name) % f:
                raise InputValueError(f"rollout.{name}: must be a multiple of frames_per_block ({f}), "
                                      f"got {getattr(r, name)}")
        if r.streaming_chunk_size > 0 and r.streaming_min_new_frame == 0:
            raise InputValueError("rollout.streaming_min_new_frame: must be > 0 when streaming_chunk_size is set")
        chunks = chunk_layout(r.num_blocks * f, r.streaming_chunk_size, r.streaming_min_new_frame)
        for fork in range(r.fork_min, r.fork_max + 1):
            start = fork * f
            end = next(stop for begin, stop in chunks if begin <= start < stop)
            if start + r.perturbed_blocks * f > end:
                raise InputValueError(f"rollout.fork_min/fork_max: the {r.perturbed_blocks} perturbed blocks from "
                                      f"fork block {fork} (frame {start}) leave its streaming chunk (ends at frame "
                                      f"{end}); change rollout.streaming_chunk_size / streaming_min_new_frame or "
                                      f"the forks")

    def validate(self) -> "TrainConfig":
        """Check every field's type (from its annotation) and range (RANGES), then the cross-field rules; raises
        a one-line InputValueError / InputTypeError (ValueError / TypeError) naming the key."""
        for section in dataclasses.fields(self):
            instance = getattr(self, section.name)
            hints = typing.get_type_hints(type(instance))
            for item in dataclasses.fields(instance):
                key, value = f"{section.name}.{item.name}", getattr(instance, item.name)
                _check_type(key, value, hints[item.name])
                if key in RANGES and value is not None:
                    allowed, description = RANGES[key]
                    if not allowed(value):
                        raise InputValueError(f"{key}: must be {description}, got {value!r}")
        self._check_cross_fields()
        return self

    def _check_cross_fields(self) -> None:
        rollout, streaming = self.rollout, self.streaming
        if not rollout.fork_min <= rollout.fork_max:
            raise InputValueError(f"rollout.fork_min/fork_max: need fork_min <= fork_max, got {rollout.fork_min}, "
                                  f"{rollout.fork_max}")
        if rollout.fork_max + rollout.perturbed_blocks > rollout.num_blocks:
            raise InputValueError(f"rollout.perturbed_blocks: fork_max + perturbed_blocks ({rollout.fork_max} + "
                                  f"{rollout.perturbed_blocks}) must be <= num_blocks ({rollout.num_blocks})")
        routed = self.num_routed()
        for fork in (rollout.fork_min, rollout.fork_max):
            pool = streaming.route_pool_size(fork, rollout.perturbed_blocks)
            if pool <= routed:
                raise InputValueError(
                    f"rollout.fork_min/fork_max: forking at block {fork} leaves an eligible pool of {pool} frames, "
                    f"not more than num_routed={routed}: the branches could not differ (fork later, or raise "
                    f"streaming.cache_frames)")
        self._validate_chunks()
        steps = len(streaming.timesteps)
        if not 1 <= self.replay.grad_steps <= steps:
            raise InputValueError(f"replay.grad_steps: must be in [1, {steps}] (one per timestep), got "
                                  f"{self.replay.grad_steps}")
        if self.replay.step_weights is not None and len(self.replay.step_weights) != steps:
            raise InputValueError(f"replay.step_weights: needs {steps} entries (one per timestep), got "
                                  f"{len(self.replay.step_weights)}")
        if list(streaming.timesteps) != sorted(set(streaming.timesteps), reverse=True):
            raise InputValueError(f"streaming.timesteps: must be strictly decreasing, got {streaming.timesteps}")
        for index, spec in enumerate(self.reward.components):
            where = f"reward.components[{index}]"
            if not isinstance(spec.get("name"), str):
                raise InputValueError(f"{where}.name: must name a reward (a string), got {spec.get('name')!r}")
            weight = spec.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InputTypeError(f"{where}.weight: must be a finite number, got {weight!r}")


def _describe(annotation, article: bool = True) -> str:
    """What an annotation allows, in words: "an integer", "a list of 2 finite numbers or null", ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join("null" if arg is type(None) else _describe(arg, article) for arg in args)
    if origin in (tuple, list):
        if origin is list or len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0], article=False)}s"
        return f"a list of {len(args)} {_describe(args[0], article=False)}s"
    noun = {int: "integer", float: "finite number", bool: "boolean (true/false)", str: "string", dict: "mapping",
            Any: "value"}.get(origin or annotation, getattr(annotation, "__name__", str(annotation)))
    if not article:
        return noun.replace(" (true/false)", "")
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _type_ok(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union:
        return any(_type_ok(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # ints are numbers too; NaN / inf never are a meaningful setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1])
                                               for k, v in value.items())
    raise TypeError(f"config annotation {annotation!r} has no type rule")  # a programming error, not input


def _check_type(key: str, value, annotation) -> None:
    if not _type_ok(value, annotation):
        raise InputTypeError(f"{key}: must be {_describe(annotation)}, got {value!r}")


def _at_least(minimum):
    return (lambda value: value >= minimum), f">= {minimum}"


def _each(check: Callable, description: str):
    return (lambda values: len(values) > 0 and all(check(v) for v in values)), description


def _one_of(*choices):
    return (lambda value: value in choices), "one of " + ", ".join(choices)


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# Ranges of the config fields, key -> (allowed(value), what is allowed). Types come from the annotations; a new
# field is range-checked by adding its line here (None values of Optional fields are not range-checked).
RANGES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "run.steps": _at_least(1), "run.seed": _at_least(0), "run.checkpoint_every": _at_least(0),
    "run.cpu_threads": _at_least(0), "run.output_dir": ((lambda value: value != ""), "a non-empty path"),
    "run.device": ((lambda value: _DEVICE.fullmatch(value) is not None), "auto, cpu, cuda or cuda:N"),
    "model.pretrained": ((lambda value: value != ""), "a path or hub id (or null)"),
    "model.causal_checkpoint": ((lambda value: value != ""), "a checkpoint file (or null)"),
    "model.dtype": _one_of("float32", "bfloat16", "float16"), "model.backend": _one_of(*_BACKENDS),
    **{f"model.{name}": _at_least(1) for name in ("num_layers", "num_attention_heads", "attention_head_dim",
                                                  "ffn_dim", "text_dim", "freq_dim", "latent_channels")},
    "model.trainable": ((lambda values: all(v != "" for v in values)), "a list of non-empty name parts"),
    **{f"streaming.{name}": _at_least(1) for name in ("frames_per_block", "window_frames", "nearest_frames",
                                                      "cache_frames")},
    "streaming.sink_frames": _at_least(0),
    "streaming.memory_bank_frames": _at_least(0), "streaming.bank_record_interval": _at_least(1),
    "streaming.bank_rule": _one_of("rollout", "inference"),
    "streaming.timesteps": _each(lambda value: 0 < value <= 1000, "a non-empty list of integers in (0, 1000]"),
    "streaming.shift": ((lambda value: value > 0), "> 0"),
    **{f"rollout.{name}": _at_least(1) for name in ("num_blocks", "perturbed_blocks", "groups_per_step",
                                                    "num_prompts", "prompt_length")},
    "rollout.fork_min": _at_least(0), "rollout.fork_max": _at_least(0), "rollout.num_branches": _at_least(2),
    "rollout.num_routed": _at_least(0), "rollout.sampler": _one_of("chr", "uniform"),
    "rollout.latent_height": ((lambda value: value >= 2 and value % 2 == 0), "an even integer >= 2 (2x2 patches)"),
    "rollout.latent_width": ((lambda value: value >= 2 and value % 2 == 0), "an even integer >= 2 (2x2 patches)"),
    "rollout.prompts_file": ((lambda value: value != ""), "a .pt file (or null)"),
    "replay.grad_steps": _at_least(1), "replay.policy_window_frames": _at_least(0),
    "rollout.streaming_chunk_size": _at_least(0), "rollout.streaming_min_new_frame": _at_least(0),
    "streaming.context_noise": ((lambda value: 0 <= value < 1000), "a timestep in [0, 1000)"),
    "reward.long_reward_normal_clip_len": _at_least(1), "reward.vae_temporal_stride": _at_least(1),
    "replay.step_weights": _each(lambda value: value >= 0, "a list of numbers >= 0 (or null)"),
    "replay.energy_scale": ((lambda value: value > 0), "> 0"), "replay.energy_backend": _one_of(*_BACKENDS),
    "objective.clip_low": ((lambda value: 0 <= value < 1), "in [0, 1)"),
    "objective.clip_high": ((lambda value: value > 0), "> 0"), "objective.beta": _at_least(0),
    "objective.advantage_clamp": ((lambda value: value > 0), "> 0"),
    "objective.local_weight": _at_least(0), "objective.global_weight": _at_least(0),
    "reward.components": ((lambda value: len(value) > 0), "a non-empty list of {name: ..., weight: ...}"),
    "optim.lr": ((lambda value: value > 0), "> 0"), "optim.weight_decay": _at_least(0),
    "optim.betas": _each(lambda value: 0 <= value < 1, "two numbers in [0, 1)"),
    "optim.grad_clip": _at_least(0), "optim.ema_decay": ((lambda value: 0 <= value < 1), "in [0, 1)"),
    "optim.updates_per_rollout": _at_least(1), "optim.old_sync_every": _at_least(1),
}


def _merge(instance, updates: Dict[str, Any], where: str):
    """A copy of dataclass `instance` with `updates` applied; nested sections recurse; unknown keys raise."""
    names = {f.name: f for f in dataclasses.fields(instance)}
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise InputValueError(f"{where}{key}: unknown config key; known: {sorted(names)}")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise InputTypeError(f"{where}{key}: must be a mapping of its keys, got {value!r}")
            changes[key] = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, tuple) and isinstance(value, list):
            changes[key] = tuple(value)
        elif isinstance(current, float) and not isinstance(value, bool) and isinstance(value, (int, str)):
            try:  # YAML 1.1 reads "1e-3" as a string
                changes[key] = float(value)
            except ValueError:
                raise InputTypeError(f"{where}{key}: must be a finite number, got {value!r}") from None
        else:
            changes[key] = value
    return dataclasses.replace(instance, **changes)


# Presets: overrides on the defaults. "tiny" is the defaults themselves (a random 2-layer model, CPU-friendly).
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": {},
    # LongLive / Self-Forcing geometry on causal Wan2.1-T2V-1.3B (GPU). Give the weights with model.causal_checkpoint
    # (Self-Forcing / LongLive .pt) or model.pretrained (diffusers folder), and text embeddings with
    # rollout.prompts_file (UMT5 outputs [P, 512, 4096]); without them it trains a random model on random prompts.
    "wan1.3b": {
        "model": {"dtype": "bfloat16", "num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128,
                  "ffn_dim": 8960, "text_dim": 4096, "freq_dim": 256, "latent_channels": 16,
                  "gradient_checkpointing": True},
        "streaming": {"frames_per_block": 3, "sink_frames": 3, "window_frames": 12, "nearest_frames": 4,
                      "cache_frames": 21},
        # forks at frame >= 21, as LongLive-KVPO: the route pool then holds 14 (P = 1) or 11 (P = 2) older frames
        "rollout": {"num_blocks": 10, "fork_min": 7, "fork_max": 8, "perturbed_blocks": 2, "num_branches": 8,
                    "latent_height": 60, "latent_width": 104, "prompt_length": 512,
                    "streaming_chunk_size": 21, "streaming_min_new_frame": 18},
        "replay": {"grad_steps": 2, "energy_scale": 1.0, "rematerialize": True},
        "optim": {"lr": 1e-5, "ema_decay": 0.999, "updates_per_rollout": 1},
        "run": {"steps": 500, "checkpoint_every": 50, "output_dir": "runs/wan1.3b"},
    },
}


# MemFlow (the released configs/train_kvpo_memflow.yaml is train_kvpo_longlive.yaml plus these differences; the
# value list with file:line is in docs/memflow.md): LongLive's preset with the memory bank and m_nearest_frames 3.
PRESETS["memflow1.3b"] = _merge(TrainConfig(), PRESETS["wan1.3b"], "").to_dict()
PRESETS["memflow1.3b"]["streaming"].update(nearest_frames=3, memory_bank_frames=3, bank_record_interval=3,
                                           bank_rule="rollout")
PRESETS["memflow1.3b"]["model"].update(causal_checkpoint_key="generator")  # the released trainer's first choice
PRESETS["memflow1.3b"]["run"].update(output_dir="runs/memflow1.3b")


def load_config(preset: Optional[str] = None, path: Optional[str] = None,
                overrides: Optional[List[str]] = None) -> TrainConfig:
    """Defaults, then the preset (named here or by the file's ``preset:`` key), then the YAML file, then
    ``section.key=value`` overrides (values parsed as YAML). Validated."""
    file_updates: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as handle:
                file_updates = yaml.safe_load(handle) or {}
        except OSError as error:
            raise InputValueError(f"--config {path}: cannot read the config file ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise InputValueError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(file_updates, dict):
            raise InputValueError(f"--config {path}: the config file must hold a mapping of sections")
        preset = file_updates.pop("preset", preset)
    config = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise InputValueError(f"preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
        config = _merge(config, PRESETS[preset], "")
    config = _merge(config, file_updates, "")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise InputValueError(f"--set {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise InputValueError(f"--set {item!r}: the value is not valid YAML") from None
        config = _merge(config, {section: {name: value}}, "")
    return config.validate()


def save_config(config: TrainConfig, path: str) -> None:
    with open(path, "w") as handle:
        yaml.safe_dump(_plain(config.to_dict()), handle, sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# Keys that may differ between a checkpoint's config and the resuming run's without --allow-config-change: they
# change how long / where / how visibly the run goes, or the kernel backend, not what is trained.
RESUMABLE = frozenset({"run.steps", "run.checkpoint_every", "run.progress", "run.plot", "run.resume",
                       "run.output_dir", "run.device", "run.cpu_threads", "model.backend", "replay.energy_backend",
                       "model.gradient_checkpointing"})
# Keys that define the trained state itself (geometry, dtype, which parameters train): never changed on resume.
FIXED_ON_RESUME = frozenset({f"model.{name}" for name in (
    "pretrained", "subfolder", "dtype", "num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim",
    "text_dim", "freq_dim", "latent_channels", "trainable")})


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:  # sections; their fields' values (lists, dicts) stay whole
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{"section.key": (old value, new value)}`` for every key whose value differs (plain dicts of to_dict)."""
    old_flat, new_flat = _flatten(_plain(old)), _flatten(_plain(new))
    return {key: (old_flat.get(key), new_flat.get(key)) for key in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(key) != new_flat.get(key)}
