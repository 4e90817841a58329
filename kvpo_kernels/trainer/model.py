"""Building the trained model: the WanTransformer3DModel (pretrained, causal checkpoint or random init), its dtype
cast that keeps diffusers' float32 modules, and the device it runs on; the model stack around it (its LoRA adapter,
the text prompts, the VAE decoder), the planned memory (from meta tensors) and the start-up checks that refuse a run
which cannot work."""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import torch

from .config import TrainConfig, chunk_layout
from .distributed import DistInfo
from .errors import InputValueError
from .rollout import group_pool_blocks, policy_window

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_transformer(config: TrainConfig):
    """The WanTransformer3DModel: pretrained (``model.pretrained``) or a random one of the configured geometry."""
    from diffusers import WanTransformer3DModel

    model_config = config.model
    dtype = DTYPES[model_config.dtype]
    if model_config.pretrained is not None:
        model = WanTransformer3DModel.from_pretrained(model_config.pretrained, subfolder=model_config.subfolder,
                                                      torch_dtype=dtype)
    else:
        model = random_transformer(config)
    if model_config.causal_checkpoint is not None:  # over a pretrained folder's weights too (LongLive over Wan2.1)
        from ..integrations.diffusers import load_causal_wan_weights

        load_causal_wan_weights(model, model_config.causal_checkpoint, key=model_config.causal_checkpoint_key)
    # (float32 is the construction dtype: no cast, which diffusers would warn about; from_pretrained cast already)
    if model_config.pretrained is None and dtype != torch.float32:
        cast_keeping_fp32_modules(model, dtype)
    if model_config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def cast_keeping_fp32_modules(model, dtype: torch.dtype) -> None:
    """Cast ``model`` to ``dtype`` in place as ``from_pretrained(torch_dtype=dtype)`` does: the modules diffusers keeps
    in float32 (``_keep_in_fp32_modules``: for Wan the RoPE tables, time embedder, modulation tables and norms) keep
    their dtype. ``model.to(dtype)`` would round the float32 RoPE cos/sin to bf16 (up to 2e-3 error in every rotation)
    and the timestep embedding and modulation, unlike diffusers' own bf16 loading (``model.pretrained``), which the
    random / causal-checkpoint model now matches. (The first parameter, the fp32 ``scale_shift_table``, then makes
    the rollout latents fp32; the transformer itself computes in bf16.)"""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not keep.intersection(name.split(".")):
                tensor.data = tensor.data.to(dtype)


def random_transformer(config: TrainConfig):
    """A randomly initialised Wan transformer of the ``model`` section's geometry, seeded by ``run.seed`` (the
    global RNG is forked, not advanced)."""
    from diffusers import WanTransformer3DModel

    model_config = config.model
    frames = config.rollout.num_blocks * config.streaming.frames_per_block
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=model_config.num_attention_heads,
            attention_head_dim=model_config.attention_head_dim, in_channels=model_config.latent_channels,
            out_channels=model_config.latent_channels, text_dim=model_config.text_dim,
            freq_dim=model_config.freq_dim, ffn_dim=model_config.ffn_dim, num_layers=model_config.num_layers,
            rope_max_seq_len=max(1024, 2 * frames))
    return model


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``run.device`` -> a torch device: ``auto`` is this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and info.world_size > 1:
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(name)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A random-initialised model above this size is no training run (the 1.3B preset without weights), nor is one on
# the CPU: kvpo-train refuses both before building anything.
REAL_MODEL_PARAMS = 100_000_000
GIB = 1024 ** 3


def add_configured_lora(transformer, config: TrainConfig) -> Optional[list]:
    """The ``model.lora_*`` adapter on ``transformer`` (and ``model.lora_checkpoint`` loaded into it); returns its
    parameters (the only trainable ones), or None when ``model.lora_rank`` is 0 / null."""
    m = config.model
    if not m.lora_rank:
        return None
    from ..integrations.diffusers.lora import add_lora, load_causal_wan_lora

    params = add_lora(transformer, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
    if m.lora_checkpoint is not None:
        load_causal_wan_lora(transformer, m.lora_checkpoint)
    return params


def _component_path(config: TrainConfig, explicit: Optional[str], subfolder: str) -> Optional[str]:
    """``explicit``, else ``model.pretrained`` when it is a local folder holding ``subfolder``, else None."""
    if explicit is not None:
        return explicit
    pretrained = config.model.pretrained
    if pretrained is not None and os.path.isdir(os.path.join(pretrained, subfolder)):
        return pretrained
    return None


def load_prompts(config: TrainConfig, device):
    """``(embeds [P, L, D] float32 or None, texts, entries or None)`` from ``rollout.prompts_file``: a ``.txt`` file
    (one prompt a line; a line may hold several segments with their switch frames, ``text || 39 || text``: see
    :func:`~kvpo_kernels.trainer.rollout.parse_prompt_line`) has its distinct segment texts encoded by the UMT5
    encoder of ``model.text_encoder`` / ``model.pretrained`` to ``rollout.prompt_length`` tokens, cached in
    ``run.output_dir/prompt_cache``; ``entries`` (one :class:`PromptEntry` a line) index those texts. A ``.pt`` file
    holds the embeddings (no texts, one single-segment entry per embedding)."""
    path = config.rollout.prompts_file
    if path is None or not path.endswith(".txt"):
        return None, [], None
    from ..integrations.diffusers.text import cached_prompt_embeds, read_prompts_file
    from .rollout import prompt_entries_from_lines

    try:
        texts, entries = prompt_entries_from_lines(read_prompts_file(path))
    except ValueError as error:
        raise InputValueError(f"rollout.prompts_file {path}: {error}") from None
    encoder = _component_path(config, config.model.text_encoder, "text_encoder")
    if encoder is None:
        raise InputValueError("rollout.prompts_file: a .txt prompts file needs the UMT5 text encoder: set "
                         "model.text_encoder (or model.pretrained to a Wan folder with text_encoder/ and tokenizer/)")
    # UMT5 in bf16 on a GPU (as Wan ships it), float32 on the CPU
    on_gpu = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" and on_gpu else torch.float32
    embeds = cached_prompt_embeds(texts, encoder, os.path.join(config.run.output_dir, "prompt_cache"), device=device,
                                  dtype=dtype, max_length=config.rollout.prompt_length)
    return embeds, texts, entries


def build_decoder(config: TrainConfig, device):
    """The Wan VAE decoder (``model.vae``, or ``model.pretrained``'s ``vae/``), or None when there is none."""
    path = _component_path(config, config.model.vae, "vae")
    if path is None:
        return None
    from ..integrations.diffusers.vae import WanLatentDecoder, load_wan_vae

    return WanLatentDecoder(load_wan_vae(path), device=device, batch_size=config.reward.batch_size,
                            offload=config.model.offload)


@dataclasses.dataclass
class MemoryPlan:
    """Planned memory of a run (bytes), from meta tensors: no weight is allocated to compute it."""

    params: int                 # parameter count of the transformer (LoRA included)
    trainable: int              # trainable parameter count (the LoRA adapter when on)
    weights_bytes: int          # the model's weights at model.dtype
    optimizer_bytes: int        # AdamW moments (+ fp32 master weights for a bf16/fp16 model), fp32
    copies_bytes: int           # old policy, reference policy and EMA copies of the trainable weights
    kv_pool_bytes: int          # one group's KV pool (prefix window + every block the branches write)
    activation_bytes: int       # estimate: the replay's saved activations of one gradient step

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.optimizer_bytes + self.copies_bytes + self.kv_pool_bytes +
                self.activation_bytes)

    def format(self) -> str:
        return (f"planned memory: {self.params / 1e6:.2f}M params ({_size(self.weights_bytes)}), "
                f"{self.trainable / 1e6:.2f}M trainable, optimizer {_size(self.optimizer_bytes)}, old/ref/EMA copies "
                f"{_size(self.copies_bytes)}, KV pool per group {_size(self.kv_pool_bytes)}, activations "
                f"~{_size(self.activation_bytes)} (estimate); total ~{_size(self.total_bytes)}")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / 2 ** 20:.2f} MiB"


def _meta_model(config: TrainConfig):
    """The configured transformer (a pretrained folder's config, else the model section's geometry) + LoRA on the
    meta device."""
    from diffusers import WanTransformer3DModel

    m = config.model
    geometry = None
    if m.pretrained is not None:
        try:
            geometry = WanTransformer3DModel.load_config(m.pretrained, subfolder=m.subfolder)
        except OSError:
            raise InputValueError(f"model.pretrained: {m.pretrained!r} holds no {m.subfolder}/config.json (a local "
                                  "diffusers Wan folder, or a reachable hub id)") from None
    with torch.device("meta"):
        if geometry is not None:
            model = WanTransformer3DModel.from_config(geometry)
        else:
            model = random_transformer(config)
        if config.model.lora_rank:
            from ..integrations.diffusers.lora import add_lora

            m = config.model
            add_lora(model, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
    return model


def plan_memory(config: TrainConfig) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``config`` (the model geometry of its ``model`` section, built on the meta
    device). The activation figure is an estimate: per replayed block forward ``G * f * h/2 * w/2`` tokens keep
    ~``12 * dim + 2 * ffn_dim`` values per layer (norms, q/k/v, attention output, modulation, MLP hidden); with
    gradient checkpointing one layer's worth plus each layer's input; with rematerialisation one forward's worth."""
    m, r, s = config.model, config.rollout, config.streaming
    model = _meta_model(config)
    geometry = model.config
    params = sum(p.numel() for p in model.parameters())
    if m.lora_rank:
        trainable = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    elif m.trainable:
        trainable = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in m.trainable))
    else:
        trainable = params
    width, low_precision = DTYPE_BYTES[m.dtype], m.dtype != "float32"
    optimizer = trainable * 4 * (3 if low_precision else 2)
    copies = trainable * width * (1 + (config.objective.beta != 0))
    copies += trainable * 4 * (config.optim.ema_decay > 0)
    dim, layers = geometry.num_attention_heads * geometry.attention_head_dim, geometry.num_layers
    tokens_per_frame = (r.latent_height // 2) * (r.latent_width // 2)
    f = s.frames_per_block
    forks = config.fork_blocks()   # the earliest eligible fork writes the most blocks
    chunks = chunk_layout(r.num_blocks * f, r.streaming_chunk_size, r.streaming_min_new_frame)
    replayed = max(policy_window(fork * f, r.perturbed_blocks, chunks, f, r.num_blocks * f,
                                 config.replay.policy_window_frames) for fork in forks)
    switches = (r.prompts_file or "").endswith(".txt")   # prompt segments come from text lines only
    frames = group_pool_blocks(s, r.num_branches, r.num_blocks - forks[0], replayed, switches)
    kv_pool = frames * tokens_per_frame * 2 * dim * layers * width
    chunk = config.replay.branch_backward_chunk_size   # branches in one graph: the chunk, or all G
    tokens = (chunk if 0 < chunk < r.num_branches else r.num_branches) * f * tokens_per_frame
    per_layer = tokens * (12 * dim + 2 * geometry.ffn_dim) * width
    one_forward = per_layer + tokens * dim * width * layers if m.gradient_checkpointing else per_layer * layers
    forwards = 1 if config.replay.rematerialize else replayed * config.replay.grad_steps
    return MemoryPlan(params, trainable, params * width, optimizer, copies, kv_pool, one_forward * forwards)


def check_startup(config: TrainConfig, device: torch.device, plan: MemoryPlan) -> None:
    """Refuse (ValueError listing everything missing) a run of a real-size model without weights, without text
    prompts, or on the CPU, before anything is built."""
    if plan.params < REAL_MODEL_PARAMS:
        return
    m, missing = config.model, []
    if m.pretrained is None and m.causal_checkpoint is None:
        missing.append("weights: set model.pretrained (a diffusers Wan folder) or model.causal_checkpoint "
                       "(Self-Forcing / LongLive .pt); without them this is a random model")
    if config.rollout.prompts_file is None:
        missing.append("prompts: set rollout.prompts_file (a .txt file, one prompt a line, or UMT5 embeddings .pt)")
    if device.type != "cuda":
        missing.append(f"a GPU: run.device resolves to {device}, a {plan.params / 1e9:.2f}B-parameter model needs "
                       "CUDA")
    if missing:
        raise InputValueError(f"refusing to start a {plan.params / 1e9:.2f}B-parameter run; missing: " +
                              "; ".join(missing))
