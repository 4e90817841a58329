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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml


@dataclass
class RunConfig:
    steps: int = 150                       # optimizer steps (each: one group rollout per group, then the update)
    seed: int = 0                          # seeds the model init, prompts, reward decoder and every rollout's noise
    output_dir: str = "runs/tiny"          # metrics.jsonl, config.yaml, checkpoint.pt and metrics.png go here
    device: str = "auto"                   # "auto" (cuda:LOCAL_RANK when available, else cpu), "cpu", "cuda", ...
    checkpoint_every: int = 0              # write checkpoint.pt every N steps (0: only at the end)
    resume: bool = True                    # continue from output_dir/checkpoint.pt when it exists
    progress: bool = True                  # tqdm progress bar (rank 0 only)
    plot: bool = True                      # write metrics.png at the end (rank 0 only)
    sample_every: int = 0                  # write samples/step_N.mp4 (anchor | best | worst branch) every N steps and
    #                                        at the end (0: off; needs the models extra)
    eval_prompts: int = 4                  # kvpo-eval / --eval-only: the first N prompts (0: all)
    eval_seeds: List[int] = field(default_factory=lambda: [0, 1])  # kvpo-eval: one video per prompt and seed
    cpu_threads: int = 1                   # kvpo-train on CPU: torch intra-op threads (0: torch's default). Small
    #                                        models run fastest single-threaded; extra threads only add sync cost


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None       # diffusers WanTransformer3DModel path or hub id; None: random init from below
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
    prompt_length: int = 8                 # tokens per prompt: synthetic embeddings, or the UMT5 length of a .txt
    #                                        prompts file (Wan: 512)
    prompts_file: Optional[str] = None     # .txt (one prompt a line, encoded by model.text_encoder) or .pt file with
    #                                        precomputed text embeddings [P, L, text_dim] (e.g. UMT5)


@dataclass
class ReplayConfig:
    grad_steps: int = 2                    # gradients flow through the first k denoising steps of each block only
    step_weights: Optional[List[float]] = None  # per-step energy weights [K]; None: all 1
    blocks: str = "perturbed"              # replayed blocks: perturbed (the P routed ones) | chunk (fork to end)
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
    # built-in reward entries: {name: brightness | smoothness, weight: float, ...constructor kwargs}, or the CLIP
    # score on VAE-decoded frames: {name: clip, weight: float, path: local CLIP folder, num_frames: 4}
    batch_size: int = 1                    # samples the VAE decodes at once (bounds its activation memory)


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

    def validate(self) -> "TrainConfig":
        r, s = self.rollout, self.streaming
        if not 0 <= r.fork_min <= r.fork_max:
            raise ValueError(f"rollout.fork_min/fork_max: need 0 <= fork_min <= fork_max, got {r.fork_min}, {r.fork_max}")
        if r.fork_max + r.perturbed_blocks > r.num_blocks:
            raise ValueError(f"rollout.perturbed_blocks: fork_max + perturbed_blocks ({r.fork_max} + "
                             f"{r.perturbed_blocks}) must be <= num_blocks ({r.num_blocks})")
        if r.num_branches < 2:
            raise ValueError(f"rollout.num_branches must be >= 2, got {r.num_branches}")
        routed = self.num_routed()
        for fork in (r.fork_min, r.fork_max):
            pool = s.route_pool_size(fork, r.perturbed_blocks)
            if pool <= routed:
                raise ValueError(f"rollout.fork_min/fork_max: forking at block {fork} leaves an eligible pool of {pool}"
                                 f" frames, not more than num_routed={routed}: the branches could not differ "
                                 f"(fork later, or raise streaming.cache_frames)")
        if r.sampler not in ("chr", "uniform"):
            raise ValueError(f"rollout.sampler must be 'chr' or 'uniform', got {r.sampler!r}")
        if self.replay.blocks not in ("perturbed", "chunk"):
            raise ValueError(f"replay.blocks must be 'perturbed' or 'chunk', got {self.replay.blocks!r}")
        steps = len(s.timesteps)
        if not 1 <= self.replay.grad_steps <= steps:
            raise ValueError(f"replay.grad_steps must be in [1, {steps}], got {self.replay.grad_steps}")
        if self.replay.step_weights is not None and len(self.replay.step_weights) != steps:
            raise ValueError(f"replay.step_weights needs {steps} entries (one per timestep)")
        if self.model.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.model.dtype!r}")
        if self.optim.updates_per_rollout < 1 or self.optim.old_sync_every < 1:
            raise ValueError("optim.updates_per_rollout and optim.old_sync_every must be >= 1")
        if self.model.lora_rank is not None and (isinstance(self.model.lora_rank, bool) or
                                                 not isinstance(self.model.lora_rank, int) or self.model.lora_rank < 0):
            raise ValueError(f"model.lora_rank must be an int >= 0 or null, got {self.model.lora_rank!r}")
        if self.model.lora_checkpoint is not None and not self.model.lora_rank:
            raise ValueError("model.lora_checkpoint needs model.lora_rank (the adapter's rank)")
        if self.model.lora_rank and self.model.trainable:
            raise ValueError("model.trainable and model.lora_rank exclude each other (with LoRA only the adapter trains)")
        if self.reward.batch_size < 1 or self.run.sample_every < 0 or self.run.eval_prompts < 0:
            raise ValueError("reward.batch_size must be >= 1, run.sample_every and run.eval_prompts >= 0")
        if not self.run.eval_seeds:
            raise ValueError("run.eval_seeds must hold at least one seed")
        if not self.reward.components:
            raise ValueError("reward.components must name at least one reward")
        return self


def _merge(instance, updates: Dict[str, Any], where: str):
    """A copy of dataclass `instance` with `updates` applied; nested sections recurse; unknown keys raise."""
    names = {f.name: f for f in dataclasses.fields(instance)}
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise ValueError(f"{where}{key}: unknown config key; known: {sorted(names)}")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{key}: expected a mapping, got {type(value).__name__}")
            changes[key] = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, tuple) and isinstance(value, list):
            changes[key] = tuple(value)
        elif isinstance(current, float) and not isinstance(value, bool) and isinstance(value, (int, str)):
            try:  # YAML 1.1 reads "1e-3" as a string
                changes[key] = float(value)
            except ValueError:
                raise ValueError(f"{where}{key}: expected a number, got {value!r}") from None
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
                    "latent_height": 60, "latent_width": 104, "prompt_length": 512},
        "replay": {"grad_steps": 2, "energy_scale": 1.0, "rematerialize": True},
        "optim": {"lr": 1e-5, "ema_decay": 0.999, "updates_per_rollout": 1},
        "run": {"steps": 500, "checkpoint_every": 50, "output_dir": "runs/wan1.3b"},
    },
}


def load_config(preset: Optional[str] = None, path: Optional[str] = None,
                overrides: Optional[List[str]] = None) -> TrainConfig:
    """Defaults, then the preset (named here or by the file's ``preset:`` key), then the YAML file, then
    ``section.key=value`` overrides (values parsed as YAML). Validated."""
    file_updates: Dict[str, Any] = {}
    if path is not None:
        with open(path) as handle:
            file_updates = yaml.safe_load(handle) or {}
        if not isinstance(file_updates, dict):
            raise ValueError(f"{path}: the config file must hold a mapping of sections")
        preset = file_updates.pop("preset", preset)
    config = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
        config = _merge(config, PRESETS[preset], "")
    config = _merge(config, file_updates, "")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        config = _merge(config, {section: {name: yaml.safe_load(raw)}}, "")
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
