"""The training loop: rollout -> rewards -> advantages -> replay -> Gibbs-PPO update, with checkpoints and metrics.

One optimizer step (``Trainer.train_step``):

1. every ``optim.old_sync_every`` rollouts the old (rollout) policy becomes a copy of the policy;
2. each rank rolls out its share of the step's groups with the old policy (``rollout.group_rollout``), seeded by
   (run seed, step, global group index), so any number of ranks sees the same data;
3. rewards of the chunk ("local") and of the whole video ("global") -> anchor-relative advantages ``[G]``;
4. branch log-likelihoods from TVE replays: the policy's (with graph), the old policy's and the initial
   (reference) policy's (no graph; skipped when equal to the policy's);
5. ``optim.updates_per_rollout`` times: loss per group / number of groups, backward, gradients summed over ranks,
   non-finite check (skip the step, log it, leave the weights, optimizer and checkpoint untouched), norm clipping,
   AdamW (on fp32 master weights for a bf16/fp16 model), EMA.

Metrics (one JSON line per step in ``run.output_dir/metrics.jsonl``): reward_mean / reward_anchor / reward_best (the
whole video's weighted reward: group mean, anchor, best branch), loss, policy_loss, kl, clip_fraction, ratio_mean,
entropy (of the Gibbs branch policy), scale (anchor protection), advantage_mean / advantage_abs, energy_mean,
grad_norm (before clipping), lr, skipped (+ skip_reason), time_s; averaged over groups and ranks.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, save_config
from .distributed import DistInfo, all_reduce_scalars, all_reduce_sum_, barrier, local_groups
from .objective import anchor_relative_advantages, branch_log_likelihood, kvpo_loss, step_temperatures
from .model_stack import add_configured_lora, build_decoder, load_prompts
from .rewards import CombinedReward, RewardFn, build_reward
from .rollout import backward_through_replay, group_rollout, replay_energies

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_transformer(config: TrainConfig):
    """The WanTransformer3DModel: pretrained (``model.pretrained``) or a random one of the configured geometry."""
    from diffusers import WanTransformer3DModel

    m = config.model
    dtype = DTYPES[m.dtype]
    if m.pretrained is not None:
        model = WanTransformer3DModel.from_pretrained(m.pretrained, subfolder=m.subfolder, torch_dtype=dtype)
    else:
        model = _random_transformer(config)
    if m.causal_checkpoint is not None:   # over the pretrained folder's weights too (LongLive base over Wan2.1)
        from ..integrations.diffusers import load_causal_wan_weights

        load_causal_wan_weights(model, m.causal_checkpoint, key=m.causal_checkpoint_key)
    # (float32 is the construction dtype: no cast, which diffusers would warn about; from_pretrained cast already)
    if m.pretrained is None and dtype != torch.float32:
        _cast_keeping_fp32_modules(model, dtype)
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _cast_keeping_fp32_modules(model, dtype: torch.dtype) -> None:
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


def _random_transformer(config: TrainConfig):
    from diffusers import WanTransformer3DModel

    m = config.model
    frames = config.rollout.num_blocks * config.streaming.frames_per_block
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=m.num_attention_heads, attention_head_dim=m.attention_head_dim,
            in_channels=m.latent_channels, out_channels=m.latent_channels, text_dim=m.text_dim, freq_dim=m.freq_dim,
            ffn_dim=m.ffn_dim, num_layers=m.num_layers, rope_max_seq_len=max(1024, 2 * frames))
    return model


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and info.world_size > 1:
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(name)


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


class Trainer:
    """KVPO GRPO on a streaming Wan generator.

    config: a validated :class:`TrainConfig`. Optional overrides for use from Python: ``transformer`` (a
    WanTransformer3DModel, e.g. with LoRA adapters), ``reward_fn`` (any :class:`RewardFn`; then the component weights
    default to 1), ``prompt_embeds`` (``[P, L, text_dim]``), ``dist`` (from :func:`init_distributed`).
    """

    def __init__(self, config: TrainConfig, *, transformer=None, reward_fn: Optional[RewardFn] = None,
                 prompt_embeds: Optional[torch.Tensor] = None, dist: Optional[DistInfo] = None):
        from ..integrations.diffusers import StreamingConfig, StreamingWanGenerator

        self.config = config.validate()
        self.dist = dist or DistInfo()
        self.device = resolve_device(config.run.device, self.dist)
        lora = None
        if transformer is None:
            transformer = build_transformer(config)
            lora = add_configured_lora(transformer, config)
        self.transformer = transformer.to(self.device)
        s = config.streaming
        self.gen = StreamingWanGenerator(
            self.transformer, StreamingConfig(frames_per_block=s.frames_per_block, sink_frames=s.sink_frames,
                                              window_frames=s.window_frames, nearest_frames=s.nearest_frames,
                                              timesteps=tuple(s.timesteps), shift=s.shift,
                                              cache_frames=s.cache_frames, latent_height=config.rollout.latent_height,
                                              latent_width=config.rollout.latent_width),
            backend=config.model.backend)
        tcfg = self.transformer.config
        self.latent_shape = (tcfg.in_channels, config.rollout.latent_height, config.rollout.latent_width)

        # Trainable parameters: those whose name contains one of model.trainable (the rest frozen); without that
        # list, all of a model built here, or the requires_grad ones of a model passed in (e.g. LoRA adapters).
        self.trainable = [] if lora is None else lora
        for name, param in ([] if lora is not None else self.transformer.named_parameters()):
            if config.model.trainable:
                param.requires_grad_(any(key in name for key in config.model.trainable))
            elif transformer is None:
                param.requires_grad_(True)
            if param.requires_grad:
                self.trainable.append(param)
        if not self.trainable:
            raise ValueError(f"model.trainable={config.model.trainable} selects no parameter")

        text_embeds, self.prompt_texts = (None, []) if prompt_embeds is not None else load_prompts(config, self.device)
        self.prompts = self._prompts(prompt_embeds if prompt_embeds is not None else text_embeds, tcfg.text_dim).to(
            self.device, next(self.transformer.parameters()).dtype)
        self.decoder = build_decoder(config, self.device)   # the Wan VAE of the pixel rewards and sample videos
        if reward_fn is None:
            reward_fn = build_reward(config.reward.components, self.latent_shape[0], config.run.seed,
                                     decoder=self.decoder, prompts=self.prompt_texts, device=self.device,
                                     offload=config.model.offload)
            weights = [float(spec.get("weight", 1.0)) for spec in config.reward.components]
        else:
            weights = [1.0] * len(reward_fn.names)
            reward_fn = reward_fn if isinstance(reward_fn, CombinedReward) else CombinedReward([reward_fn], self.decoder)
        self.reward_fn = reward_fn
        self.component_weights = torch.tensor(weights, dtype=torch.float64)
        self.step_weights = (None if config.replay.step_weights is None
                             else torch.tensor(config.replay.step_weights, dtype=torch.float32))

        o = config.optim
        # A bf16/fp16 model trains through fp32 master weights: AdamW steps (lr 1e-5 x O(1)) are mostly below
        # half a bf16 ulp of the weights and would round away. The model keeps the low-precision copy for the
        # forwards; the optimizer, its clipping and the EMA work on the fp32 masters.
        self.master = ([p.detach().float().clone().requires_grad_() for p in self.trainable]
                       if any(p.dtype != torch.float32 for p in self.trainable) else None)
        self.opt_params = self.master if self.master is not None else self.trainable
        self.optimizer = torch.optim.AdamW(self.opt_params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.ema = [p.detach().clone() for p in self.opt_params] if o.ema_decay > 0 else None
        self.old = [p.detach().clone() for p in self.trainable]
        self.ref = [p.detach().clone() for p in self.trainable] if config.objective.beta != 0 else None
        # Versions tell when the old / reference weights equal the policy's, which saves their replays.
        self.version = 0          # optimizer steps taken
        self.old_version = 0      # the version the old policy was copied from
        self.step = 0             # train steps done (skipped ones included: their rollouts were consumed)
        self.rollouts = 0         # rollouts done (old-policy sync counter)
        self.metrics_path = os.path.join(config.run.output_dir, "metrics.jsonl")
        self.checkpoint_path = os.path.join(config.run.output_dir, "checkpoint.pt")

    # ---------------------------------------------------------------------------------------------- set-up helpers
    def _prompts(self, prompt_embeds: Optional[torch.Tensor], text_dim: int) -> torch.Tensor:
        r = self.config.rollout
        if prompt_embeds is None and r.prompts_file is not None:
            prompt_embeds = torch.load(r.prompts_file, map_location="cpu")
        if prompt_embeds is None:
            gen = torch.Generator().manual_seed(self.config.run.seed + 1)
            prompt_embeds = torch.randn(r.num_prompts, r.prompt_length, text_dim, generator=gen)
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != text_dim:
            raise ValueError(f"prompt_embeds must be [P, L, {text_dim}], got {tuple(prompt_embeds.shape)}")
        return prompt_embeds

    @contextmanager
    def _weights(self, state: Optional[List[torch.Tensor]]):
        """Run with `state` as the trainable weights (a pointer swap, no copy); None: the policy's own."""
        if state is None:
            yield
            return
        with torch.no_grad():
            for i, param in enumerate(self.trainable):
                param.data, state[i] = state[i], param.data
        try:
            yield
        finally:
            with torch.no_grad():
                for i, param in enumerate(self.trainable):
                    param.data, state[i] = state[i], param.data

    def _group_rng(self, group: int) -> torch.Generator:
        # Distinct, reproducible streams per (run seed, step, global group index): independent of rank count.
        return torch.Generator().manual_seed((self.config.run.seed * 1_000_003 + self.step * 10_007 + group) % 2**63)

    # ------------------------------------------------------------------------------------------------ one step
    def _replay(self, rollout, *, grad: bool) -> torch.Tensor:
        r, p = self.config.replay, self.config.rollout
        blocks = rollout.perturbed_blocks if r.blocks == "perturbed" else p.num_blocks - rollout.fork_block
        with torch.set_grad_enabled(grad):
            return replay_energies(self.gen, rollout, num_blocks=blocks, grad_steps=r.grad_steps,
                                   step_weights=self.step_weights, energy_scale=r.energy_scale,
                                   backend=r.energy_backend)

    def train_step(self) -> Dict:
        """One optimizer step (or ``updates_per_rollout`` of them on one rollout); returns the step's metrics."""
        cfg, start = self.config, time.time()
        r = cfg.rollout
        if self.rollouts % cfg.optim.old_sync_every == 0 and self.old_version != self.version:
            for old, param in zip(self.old, self.trainable):
                old.copy_(param.detach())
            self.old_version = self.version
        old_is_policy = self.old_version == self.version
        groups = local_groups(r.groups_per_step, self.dist)

        data = []
        for group in groups:
            rng = self._group_rng(group)
            prompt_id = int(torch.randint(self.prompts.shape[0], (1,), generator=rng))
            fork = int(torch.randint(r.fork_min, r.fork_max + 1, (1,), generator=rng))
            with self._weights(None if old_is_policy else self.old):
                rollout = group_rollout(self.gen, self.prompts[prompt_id:prompt_id + 1], prompt_id=prompt_id,
                                        num_blocks=r.num_blocks, fork_block=fork, perturbed_blocks=r.perturbed_blocks,
                                        num_branches=r.num_branches, num_routed=cfg.num_routed(),
                                        latent_shape=self.latent_shape, rng=rng, sampler=r.sampler)
                energy_old = None if old_is_policy else self._replay(rollout, grad=False)
            ids = torch.full((r.num_branches + 1,), prompt_id, dtype=torch.long)
            with torch.no_grad():  # one decode of the whole video serves the chunk's and the video's pixel rewards
                local, global_ = self.reward_fn.score_group(rollout.video(), fork * cfg.streaming.frames_per_block, ids)
                local, global_ = local.double(), global_.double()
            o = cfg.objective
            advantages = anchor_relative_advantages(local, global_, self.component_weights,
                                                    signal_weights=(o.local_weight, o.global_weight),
                                                    clamp=o.advantage_clamp)
            energy_ref = None
            if self.ref is not None and self.version != 0:
                with self._weights(self.ref):
                    energy_ref = self._replay(rollout, grad=False)
            data.append(dict(rollout=rollout, advantages=advantages, energy_old=energy_old, energy_ref=energy_ref,
                             reward=(global_ * self.component_weights).sum(1), fork=fork))
        self.rollouts += 1

        for _ in range(cfg.optim.updates_per_rollout):
            record = self._update(data)  # the step's metrics are those of its last update
        record.update(step=self.step + 1, time_s=time.time() - start, old_is_policy=old_is_policy,
                      local_groups=len(groups))
        self.step += 1
        return record

    def _update(self, data: List[Dict]) -> Dict:
        cfg = self.config
        o, total_groups = cfg.objective, cfg.rollout.groups_per_step
        self.transformer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {key: 0.0 for key in ("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean", "entropy", "scale",
                                     "reward_mean", "reward_anchor", "reward_best", "advantage_mean",
                                     "advantage_abs", "energy_mean", "fork_block")}
        for item in data:
            rollout = item["rollout"]
            tau = step_temperatures(rollout.sigmas.double()).to(self.device)
            remat = cfg.replay.rematerialize
            # Rematerialising: energies without a graph here, as a leaf that collects dLoss/dE for the second pass.
            energy = self._replay(rollout, grad=False).requires_grad_() if remat else self._replay(rollout, grad=True)
            logl = branch_log_likelihood(energy.double(), tau)
            if item["energy_old"] is None:  # the old policy is the policy: its energies are this replay's, detached
                item["energy_old"] = energy.detach()
            logl_old = branch_log_likelihood(item["energy_old"].double(), tau)
            if self.ref is not None and item["energy_ref"] is None:  # still the initial policy (first update)
                item["energy_ref"] = energy.detach()
            energy_ref = item["energy_ref"]
            logl_ref = None if energy_ref is None else branch_log_likelihood(energy_ref.double(), tau)
            terms = kvpo_loss(logl, logl_old, logl_ref, item["advantages"].to(self.device), clip_low=o.clip_low,
                              clip_high=o.clip_high, beta=o.beta)
            (terms.loss / total_groups).backward()
            if remat:
                rc = cfg.replay
                backward_through_replay(self.gen, rollout, energy.grad, grad_steps=rc.grad_steps,
                                        step_weights=self.step_weights, energy_scale=rc.energy_scale,
                                        backend=rc.energy_backend)
            reward = item["reward"]
            for key, value in (("loss", terms.loss), ("policy_loss", terms.policy_loss), ("kl", terms.kl),
                               ("clip_fraction", terms.clip_fraction), ("ratio_mean", terms.ratio_mean),
                               ("entropy", terms.entropy), ("scale", terms.scale),
                               ("reward_mean", reward.mean()), ("reward_anchor", reward[-1]),
                               ("reward_best", reward[:-1].max()), ("advantage_mean", item["advantages"].mean()),
                               ("advantage_abs", item["advantages"].abs().mean()), ("energy_mean", energy.mean())):
                sums[key] += float(value.detach())
            sums["fork_block"] += item["fork"]

        # Sum over ranks (each rank's loss was already divided by the global group count: this is the mean).
        for param in self.trainable:  # a parameter the loss does not reach still takes part in the all-reduce
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        if self.master is not None:
            for master, param in zip(self.master, self.trainable):
                master.grad = param.grad.float()
        all_reduce_sum_([p.grad for p in self.opt_params], self.dist)
        keys = list(sums)
        totals = all_reduce_scalars([sums[k] for k in keys], self.dist, self.device)
        record = {k: v / total_groups for k, v in zip(keys, totals)}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.opt_params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")))
        # Identical on every rank (all-reduced), so every rank takes the same decision.
        finite = math.isfinite(record["loss"]) and math.isfinite(grad_norm)
        record.update(grad_norm=_finite_or_none(grad_norm), lr=self.optimizer.param_groups[0]["lr"],
                      skipped=not finite)
        if not finite:
            record["skip_reason"] = "non-finite loss" if not math.isfinite(record["loss"]) else "non-finite gradient"
            self.optimizer.zero_grad(set_to_none=False)
        else:
            self.optimizer.step()
            self.version += 1
            with torch.no_grad():
                if self.master is not None:
                    for param, master in zip(self.trainable, self.master):
                        param.copy_(master)
                if self.ema is not None:
                    torch._foreach_lerp_(self.ema, [p.detach() for p in self.opt_params], 1.0 - cfg.optim.ema_decay)
        return {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()}

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict:
        return {"step": self.step, "rollouts": self.rollouts, "version": self.version, "old_version": self.old_version,
                "model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                "master": self.master, "ema": self.ema, "old": self.old, "ref": self.ref, "rng": rng_state(),
                "config": self.config.to_dict()}

    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        """The trainable weights by name: the frozen rest (a LoRA's base model) is rebuilt from its source."""
        ids = {id(p) for p in self.trainable}
        return {name: p.detach() for name, p in self.transformer.named_parameters() if id(p) in ids}

    def load_state_dict(self, state: Dict) -> None:
        mine = self._trainable_state()
        if set(state["model"]) != set(mine):
            raise ValueError(f"checkpoint: its weights are not this config's trainable ones (e.g. LoRA on/off or "
                             f"other targets): {sorted(set(state['model']) ^ set(mine))[:4]}")
        with torch.no_grad():
            for name, tensor in state["model"].items():
                mine[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        for name in ("master", "ema", "old", "ref"):
            mine, saved = getattr(self, name), state[name]
            if (mine is None) != (saved is None):
                raise ValueError(f"checkpoint: {name} state present in only one of the checkpoint and the config")
            if mine is not None:
                with torch.no_grad():
                    for dst, src in zip(mine, saved):
                        dst.copy_(src)
        self.step, self.rollouts = state["step"], state["rollouts"]
        self.version, self.old_version = state["version"], state["old_version"]
        set_rng_state(state["rng"])

    def save(self, path: Optional[str] = None) -> None:
        """The checkpoint and, with LoRA, the adapter in diffusers' format (``run.output_dir/lora/``)."""
        if self.dist.is_main:
            save_checkpoint(path or self.checkpoint_path, self.state_dict())
            if self.config.model.lora_rank:
                from ..integrations.diffusers.lora import save_lora_adapter

                save_lora_adapter(self.transformer, os.path.join(self.config.run.output_dir, "lora"))
        barrier(self.dist)

    def resume(self, path: Optional[str] = None) -> bool:
        path = path or self.checkpoint_path
        if not os.path.exists(path):
            return False
        # Loaded on the CPU: the RNG states must be CPU tensors (torch.set_rng_state rejects CUDA ones), and
        # load_state_dict / copy_ move the rest to the live tensors' device without a second copy of the whole
        # training state (model, optimizer, masters, EMA, old and reference weights) in GPU memory.
        self.load_state_dict(load_checkpoint(path, map_location="cpu"))
        return True

    # -------------------------------------------------------------------------------------------------- the run
    def _log(self, record: Dict) -> None:
        if self.dist.is_main:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _sample(self, record: Dict) -> None:
        """Sample video of the fixed eval group (rank 0 only); its rewards go into the step's metrics line."""
        if self.dist.is_main:
            from .samples import write_samples

            record.update(write_samples(self, self.step))

    def train(self, steps: Optional[int] = None, callback: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
        """Run until ``steps`` (default run.steps) train steps are done; returns this call's step records."""
        cfg = self.config
        total = cfg.run.steps if steps is None else steps
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        resumed = cfg.run.resume and self.resume()
        if self.dist.is_main:
            save_config(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))
        self._log({"event": "start", "resumed_at": self.step if resumed else None,
                   "world_size": self.dist.world_size, "device": str(self.device)})
        records = []
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(self.step, total), desc="kvpo-train", unit="step",
                   disable=not (cfg.run.progress and self.dist.is_main), dynamic_ncols=True)
        while self.step < total:
            record = self.train_step()
            if cfg.run.sample_every and (self.step % cfg.run.sample_every == 0 or self.step == total):
                self._sample(record)
            records.append(record)
            self._log(record)
            if callback is not None:
                callback(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.4f}" if record["reward_mean"] is not None else "nan",
                            loss=f"{record['loss']:.3g}" if record["loss"] is not None else "nan",
                            **({"skipped": "yes"} if record["skipped"] else {}))
            # A skipped step never writes a checkpoint (and left the state as it was before the step).
            every = cfg.run.checkpoint_every
            if every and self.step % every == 0 and not record["skipped"]:
                self.save()
        bar.close()
        if records and not records[-1]["skipped"]:
            self.save()
        return records
