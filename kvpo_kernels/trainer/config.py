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
    sample_every: int = 0                  # write samples/step_N.mp4 (anchor | best | worst branch) every N steps and
    #                                        at the end (0: off; needs the models extra)
    eval_prompts: int = 4                  # kvpo-eval / --eval-only: the first N prompts (0: all)
    eval_seeds: List[int] = field(default_factory=lambda: [0, 1])  # kvpo-eval: one video per prompt and seed
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
    lora_rank: Optional[int] = None        # LoRA rank (0 / null: no LoRA, train the weights model.trainable selects)
    lora_alpha: Optional[float] = None     # LoRA alpha (scale alpha / rank); null: = lora_rank
    lora_dropout: float = 0.0              # LoRA dropout
    lora_targets: Optional[List[str]] = None  # block-relative Linear names (attn1.to_q, ffn.net.2, ...); null: every
    #                                          Linear of every transformer block
    lora_checkpoint: Optional[str] = None  # adapter to start from: LongLive lora.pt (CausalWan names, generator_lora
    #                                        entry) or a pytorch_lora_weights.safetensors written by kvpo-train
    lora_export_merged: bool = False       # also write lora/merged_transformer.safetensors (base + adapter merged,
    #                                        WanTransformer3DModel names) with each checkpoint
    text_encoder: Optional[str] = None     # UMT5 encoder folder (or Wan folder); null: model.pretrained's text_encoder/
    vae: Optional[str] = None              # AutoencoderKLWan folder (or Wan folder); null: model.pretrained's vae/
    offload: bool = False                  # keep the VAE and the reward models on the CPU between uses


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
    context_noise_grid: bool = False       # the commit's noise level as the released training scheduler looks it up
    #                                        (0.00498 at context_noise 0; StreamingConfig.context_noise_grid)
    memory_bank_frames: int = 0            # MemFlow's KV memory bank, frames per layer (released bank_size: 3); 0: off
    bank_record_interval: int = 3          # MemFlow: one bank slot per this many blocks (released record_interval: 3)
    bank_rule: str = "rollout"             # MemFlow's released bank update: rollout | inference (see memflow.py)
    route_layout: str = "sink"             # routed blocks read [sink | (bank) | route | nearest] ("sink") or, as the
    #                                        released MemFlow KVPO, [bank | route | nearest] with routes of cache
    #                                        slots ("memflow"; GroupKVCache.route_frames)

    def route_pool_size(self, fork_block: int, perturbed_blocks: int) -> int:
        """Frames a route may use when forking at `fork_block` (GroupKVCache.route_pool's formula; docs/recipe.md)."""
        f, start = self.frames_per_block, fork_block * self.frames_per_block
        if self.route_layout == "memflow":  # the released MemFlow plan's slot pool
            return max(0, min(start, self.cache_frames) - self.nearest_frames)
        first = max(self.sink_frames, start + (perturbed_blocks - 1) * f - (self.cache_frames - self.sink_frames - f))
        return max(0, start - (self.nearest_frames - f) - first)


@dataclass
class RolloutConfig:
    num_blocks: int = 8                    # blocks per video (the chunk ends with the video)
    fork_min: int = 5                      # earliest fork block (needs an eligible pool larger than num_routed)
    fork_max: int = 6                      # latest fork block (inclusive); the fork is drawn uniformly per group
    #                                        over the eligible blocks in [fork_min, fork_max] (TrainConfig.fork_blocks)
    streaming_chunk_size: int = 5          # frames of the first streaming chunk (released 21; 0: one chunk, the video)
    streaming_min_new_frame: int = 2       # frames of every later chunk (released 18); the P perturbed blocks lie
    #                                        inside one chunk, the perturbed chunk (the one holding the fork), which
    #                                        sets the local reward and the policy window
    perturb_within_first_x_chunks: int = 0  # forks only inside the first N chunks (released 7; 0: any chunk)
    perturbed_blocks: int = 1              # P: blocks generated with routed KV after the fork
    num_branches: int = 4                  # G: routed branches per group (plus one unperturbed anchor)
    num_routed: Optional[int] = None       # older frames each branch routes in; None: window - sink - nearest
    #                                        (streaming.route_layout memflow: window - nearest)
    sampler: str = "chr"                   # route sampler: chr (causal-history routing) | uniform
    groups_per_step: int = 1               # groups (prompts) per optimizer step, split across ranks
    latent_height: int = 8                 # latent grid height
    latent_width: int = 8                  # latent grid width
    num_prompts: int = 4                   # synthetic prompts (fixed random embeddings) when no prompt file is given
    prompt_length: int = 8                 # tokens per prompt: synthetic embeddings, or the UMT5 length of a .txt
    #                                        prompts file (Wan: 512)
    prompts_file: Optional[str] = None     # .pt file with precomputed text embeddings [P, L, text_dim] (e.g. UMT5)
    align_switch_to_chunk: bool = True     # move each prompt switch to the first chunk start at or after it


@dataclass
class ReplayConfig:
    grad_steps: int = 2                    # gradients flow through the first k denoising steps of each block only
    step_weights: Optional[List[float]] = None  # per-step energy weights [K]; None: all 1
    policy_window_frames: int = 0          # frames replayed from the fork block: 0 = auto (to the end of the perturbed
    #                                        chunk, released); N > 0: N rounded up to blocks, at least P blocks
    energy_space: str = "x0"               # x0: released mean (x0_rollout - x0_replay)^2 | velocity: the same / sigma^2
    energy_scale: float = 1.0              # multiplies E (a mean over elements): how peaked pi_theta is (released: 1)
    energy_backend: str = "auto"           # kernel backend of velocity_energy (auto | cuda | triton | cpu | torch)
    rematerialize: bool = False            # two-pass replay: energies without graph, then one (block, step) forward
    #                                        + backward at a time with dLoss/dE; one forward's activations alive
    branch_backward_chunk_size: int = 0    # replay forwards + backward n branches at a time (released key; MemFlow
    #                                        4): energies of all G without graph, the loss once, then per chunk a
    #                                        graph of n branches back-propagates dLoss/dE (without rematerialize one
    #                                        more no-graph replay, as released); same gradient; 0 or >= G: one graph


@dataclass
class ObjectiveConfig:
    clip_low: float = 0.1                  # ratio clip: 1 - clip_low
    clip_high: float = 0.2                 # ratio clip: 1 + clip_high
    beta: float = 10.0                     # weight of KL(pi_theta || pi_ref) against the initial policy (kl_coef)
    advantage_clamp: float = 2.5           # |A| <= this
    local_weight: float = 1.0              # weight of the perturbed chunk's reward signal
    global_weight: float = 0.5             # weight of the whole video's reward signal


@dataclass
class RewardConfig:
    components: List[Dict[str, Any]] = field(default_factory=lambda: [{"name": "brightness", "weight": 1.0}])
    # built-in reward entries: {name: brightness | smoothness, weight: float, ...constructor kwargs}, or the CLIP
    # score on VAE-decoded frames: {name: clip, weight: float, path: local CLIP folder, num_frames: 4}
    batch_size: int = 1                    # samples the VAE decodes at once (bounds its activation memory)
    long_reward_normal_clip_len: int = 36  # global reward: one clip of this many PIXEL frames per prompt segment
    vae_temporal_stride: int = 4           # pixel frames per latent frame (latent l >= 1 -> pixels 4l-3 .. 4l)


@dataclass
class OptimConfig:
    lr: float = 1e-3                       # AdamW learning rate
    weight_decay: float = 0.01             # AdamW weight decay
    warmup_steps: int = 5                  # constant LR after a linear warmup over this many old-policy windows
    #                                        (released constant_with_warmup, stepped at each old-policy sync: the
    #                                        window w trains at lr * min(1, w / warmup_steps); 0: constant)
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0                 # clip the global gradient norm to this (0: off)
    ema_decay: float = 0.999               # EMA of the trainable weights (0: off), kept in checkpoints
    updates_per_rollout: int = 1           # PPO epochs: optimizer steps on each rollout (released ppo_epochs)
    old_sync_every: int = 2                # copy the policy into the old (rollout) policy every N rollouts (released
    #                                        gradient_accumulation_steps: one optimizer step per rollout, so every
    #                                        second rollout is off-policy and the ratio clip can act)

    def lr_at(self, window: int) -> float:
        """The learning rate of old-policy window ``window`` (0-based): ``lr * min(1, window / warmup_steps)``."""
        if self.warmup_steps <= 0 or window >= self.warmup_steps:
            return self.lr
        return self.lr * window / self.warmup_steps


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
        sink = 0 if s.route_layout == "memflow" else s.sink_frames  # memflow: no separate sink in a routed block
        default = max(0, s.window_frames - sink - s.nearest_frames)
        return default if self.rollout.num_routed is None else self.rollout.num_routed

    def fork_blocks(self) -> List[int]:
        """The eligible fork blocks, ascending: ``fork_min <= b <= fork_max`` whose P perturbed blocks lie inside
        one chunk of the first ``perturb_within_first_x_chunks`` chunks (released ``plan_perturbation``)."""
        r, f = self.rollout, self.streaming.frames_per_block
        chunks = chunk_layout(r.num_blocks * f, r.streaming_chunk_size, r.streaming_min_new_frame)
        if r.perturb_within_first_x_chunks:
            chunks = chunks[:r.perturb_within_first_x_chunks]
        return [block for block in range(r.fork_min, r.fork_max + 1)
                if any(start <= block * f and (block + r.perturbed_blocks) * f <= end for start, end in chunks)]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

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
        if streaming.route_layout == "memflow" and streaming.sink_frames < 1:
            raise InputValueError("streaming.route_layout: 'memflow' needs streaming.sink_frames >= 1 (the released "
                                  "MemFlow routes only with a sink)")
        self._check_forks()
        steps = len(streaming.timesteps)
        if not 1 <= self.replay.grad_steps <= steps:
            raise InputValueError(f"replay.grad_steps: must be in [1, {steps}] (one per timestep), got "
                                  f"{self.replay.grad_steps}")
        if self.replay.step_weights is not None and len(self.replay.step_weights) != steps:
            raise InputValueError(f"replay.step_weights: needs {steps} entries (one per timestep), got "
                                  f"{len(self.replay.step_weights)}")
        if list(streaming.timesteps) != sorted(set(streaming.timesteps), reverse=True):
            raise InputValueError(f"streaming.timesteps: must be strictly decreasing, got {streaming.timesteps}")
        model = self.model
        if model.lora_checkpoint is not None and not model.lora_rank:
            raise InputValueError("model.lora_checkpoint: needs model.lora_rank (the adapter's rank)")
        if model.lora_rank and model.trainable:
            raise InputValueError("model.trainable: must be empty with model.lora_rank (only the adapter trains)")
        for index, spec in enumerate(self.reward.components):
            where = f"reward.components[{index}]"
            if not isinstance(spec.get("name"), str):
                raise InputValueError(f"{where}.name: must name a reward (a string), got {spec.get('name')!r}")
            weight = spec.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InputTypeError(f"{where}.weight: must be a finite number, got {weight!r}")


    def _check_forks(self) -> None:
        """The chunk layout and the fork range leave eligible forks, each with a pool larger than num_routed."""
        rollout, streaming = self.rollout, self.streaming
        for name in ("streaming_chunk_size", "streaming_min_new_frame"):
            if getattr(rollout, name) % streaming.frames_per_block:
                raise InputValueError(f"rollout.{name}: must be a multiple of streaming.frames_per_block "
                                      f"({streaming.frames_per_block}), got {getattr(rollout, name)}")
        if rollout.streaming_chunk_size and not rollout.streaming_min_new_frame:
            raise InputValueError("rollout.streaming_min_new_frame: must be > 0 when rollout.streaming_chunk_size "
                                  "is set")
        forks = self.fork_blocks()
        if not forks:
            raise InputValueError(f"rollout.fork_min/fork_max: no block in [{rollout.fork_min}, {rollout.fork_max}]"
                                  f" has its {rollout.perturbed_blocks} perturbed blocks inside one chunk "
                                  f"(rollout.streaming_chunk_size, streaming_min_new_frame, "
                                  f"perturb_within_first_x_chunks)")
        routed = self.num_routed()
        for fork in (forks[0], forks[-1]):  # the pool grows with the fork block until the cache is full
            pool = streaming.route_pool_size(fork, rollout.perturbed_blocks)
            if pool <= routed:
                raise InputValueError(
                    f"rollout.fork_min/fork_max: forking at block {fork} leaves an eligible pool of {pool} frames, "
                    f"not more than num_routed={routed}: the branches could not differ (fork later, or raise "
                    f"streaming.cache_frames)")


def chunk_layout(total_frames: int, chunk_size: int, min_new_frame: int) -> List[Tuple[int, int]]:
    """Streaming chunks ``[(start, end), ...]`` of a video (released ``_compute_chunk_layout``): the first holds
    ``chunk_size`` frames, each later one ``min_new_frame``, the last is cut at ``total_frames``.
    ``chunk_size == 0``: one chunk, the whole video. LongLive (147, 21, 18): [0, 21), [21, 39), ..., [129, 147)."""
    if chunk_size == 0:
        return [(0, total_frames)]
    chunks, start = [], 0
    while start < total_frames:
        end = min(start + (chunk_size if not chunks else min_new_frame), total_frames)
        chunks.append((start, end))
        start = end
    return chunks


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
    "streaming.bank_rule": _one_of("rollout", "inference"), "streaming.route_layout": _one_of("sink", "memflow"),
    "streaming.timesteps": _each(lambda value: 0 < value <= 1000, "a non-empty list of integers in (0, 1000]"),
    "streaming.shift": ((lambda value: value > 0), "> 0"),
    **{f"rollout.{name}": _at_least(1) for name in ("num_blocks", "perturbed_blocks", "groups_per_step",
                                                    "num_prompts", "prompt_length")},
    "rollout.fork_min": _at_least(0), "rollout.fork_max": _at_least(0), "rollout.num_branches": _at_least(2),
    "rollout.num_routed": _at_least(0), "rollout.sampler": _one_of("chr", "uniform"),
    "rollout.latent_height": ((lambda value: value >= 2 and value % 2 == 0), "an even integer >= 2 (2x2 patches)"),
    "rollout.latent_width": ((lambda value: value >= 2 and value % 2 == 0), "an even integer >= 2 (2x2 patches)"),
    "rollout.prompts_file": ((lambda value: value.endswith((".pt", ".pth", ".txt"))),
                             "a .txt file (one prompt a line) or a .pt file of embeddings (or null)"),
    "model.lora_rank": _at_least(0), "model.lora_alpha": ((lambda value: value > 0), "> 0 (or null: = lora_rank)"),
    "model.lora_dropout": ((lambda value: 0 <= value < 1), "in [0, 1)"),
    "model.lora_targets": ((lambda values: len(values) > 0 and all(v != "" for v in values)),
                           "a non-empty list of block-relative Linear names (or null: every Linear)"),
    **{f"model.{name}": ((lambda value: value != ""), "a local path (or null)")
       for name in ("lora_checkpoint", "text_encoder", "vae")},
    "reward.batch_size": _at_least(1), "run.sample_every": _at_least(0), "run.eval_prompts": _at_least(0),
    "run.eval_seeds": _each(lambda value: value >= 0, "a non-empty list of seeds >= 0"),
    **{f"rollout.{name}": _at_least(0) for name in ("streaming_chunk_size", "streaming_min_new_frame",
                                                    "perturb_within_first_x_chunks")},
    "replay.energy_space": _one_of("x0", "velocity"), "optim.warmup_steps": _at_least(0),
    "replay.grad_steps": _at_least(1), "replay.policy_window_frames": _at_least(0),
    "replay.branch_backward_chunk_size": _at_least(0),
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
        # Every value below and every default it keeps: docs/recipe.md, with the released file and line.
        "model": {"dtype": "bfloat16", "num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128,
                  "ffn_dim": 8960, "text_dim": 4096, "freq_dim": 256, "latent_channels": 16,
                  "gradient_checkpointing": True, "lora_rank": 256, "lora_alpha": 256.0},
        # local_attn_size 12 (sink 3 + 5 routed + 4 nearest), KV cache local 12 + slice_last_frames 21 = 33 frames
        # context_noise 0 through the released training scheduler's lookup: commits feed 0.995 x0 + 0.005 eps
        "streaming": {"frames_per_block": 3, "sink_frames": 3, "window_frames": 12, "nearest_frames": 4,
                      "cache_frames": 33, "context_noise_grid": True},
        # 147 frames in chunks [0, 21), [21, 39), ... of 18; P = 5 blocks inside one of the first 7 chunks and at
        # frame >= local_attn_size (12): 12 eligible forks, frames 21, 24, 39, 42, ..., 111, 114
        "rollout": {"num_blocks": 49, "fork_min": 4, "fork_max": 44, "perturbed_blocks": 5, "num_branches": 8,
                    "streaming_chunk_size": 21, "streaming_min_new_frame": 18, "perturb_within_first_x_chunks": 7,
                    "groups_per_step": 8,
                    "latent_height": 60, "latent_width": 104, "prompt_length": 512},
        "replay": {"grad_steps": 2, "rematerialize": True},
        "optim": {"lr": 1e-5},
        # max_train_steps 1500 counts old-policy windows of 2 rollouts; one of our steps is one rollout
        "run": {"steps": 3000, "seed": 42, "checkpoint_every": 50, "output_dir": "runs/wan1.3b"},
    },
}


# MemFlow (the released configs/train_kvpo_memflow.yaml is train_kvpo_longlive.yaml plus these differences; the
# value list with file:line is in docs/memflow.md): LongLive's preset with the memory bank and m_nearest_frames 3.
PRESETS["memflow1.3b"] = _merge(TrainConfig(), PRESETS["wan1.3b"], "").to_dict()
PRESETS["memflow1.3b"]["streaming"].update(nearest_frames=3, memory_bank_frames=3, bank_record_interval=3,
                                           bank_rule="rollout", route_layout="memflow")  # 9 routed cache slots
PRESETS["memflow1.3b"]["model"].update(causal_checkpoint_key="generator")  # the released trainer's first choice
PRESETS["memflow1.3b"]["run"].update(output_dir="runs/memflow1.3b")
PRESETS["memflow1.3b"]["replay"].update(branch_backward_chunk_size=4)  # back-propagates the 8 branches 4 at a time


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
# change how long / where / how visibly the run goes, the kernel backend, or how the backward is split to bound
# memory (replay.branch_backward_chunk_size: same gradient), not what is trained.
RESUMABLE = frozenset({"run.steps", "run.checkpoint_every", "run.progress", "run.plot", "run.resume",
                       "run.output_dir", "run.device", "run.cpu_threads", "model.backend", "replay.energy_backend",
                       "model.gradient_checkpointing", "run.sample_every", "run.eval_prompts", "run.eval_seeds",
                       "model.offload", "reward.batch_size", "model.lora_export_merged",
                       "replay.branch_backward_chunk_size"})
# Keys that define the trained state itself (geometry, dtype, which parameters train): never changed on resume.
FIXED_ON_RESUME = frozenset({f"model.{name}" for name in (
    "pretrained", "subfolder", "dtype", "num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim",
    "text_dim", "freq_dim", "latent_channels", "trainable", "lora_rank", "lora_alpha", "lora_targets")})


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
