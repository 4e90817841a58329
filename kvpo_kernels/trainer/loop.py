"""The training loop: rollout -> rewards -> advantages -> replay -> Gibbs-PPO update, with checkpoints and metrics.

One optimizer step (``Trainer.train_step``):

1. every ``optim.old_sync_every`` rollouts the old (rollout) policy becomes a copy of the policy;
2. each rank rolls out its share of the step's groups with the old policy (``rollout.group_rollout``), seeded by
   (run seed, step, global group index), so any number of ranks sees the same data;
3. rewards of the chunk ("local") and of the whole video ("global") -> anchor-relative advantages ``[G]``;
4. branch log-likelihoods from TVE replays: the policy's (with graph), the old policy's and the initial
   (reference) policy's (no graph; skipped when equal to the policy's): :meth:`Trainer._settle_energies`;
5. ``optim.updates_per_rollout`` times: loss per group / number of groups, backward (:meth:`Trainer._group_loss`),
   then (:meth:`Trainer._apply_gradients`) gradients summed over ranks, non-finite check (skip the step, log it,
   leave the weights, optimizer and checkpoint untouched), norm clipping, AdamW (on fp32 master weights for a
   bf16/fp16 model), EMA.

Metrics: one JSON line per step in ``run.output_dir/metrics.jsonl``; the keys are those of :mod:`.metrics`.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, save_config
from .distributed import DistInfo, all_reduce_scalars, all_reduce_sum_, barrier, local_groups
from .metrics import AVERAGED_METRICS
from .model import add_configured_lora, build_decoder, build_transformer, load_prompts, resolve_device
from .objective import anchor_relative_advantages, branch_log_likelihood, kvpo_loss, step_temperatures
from .rewards import CombinedReward, RewardFn, build_reward
from .rollout import GroupRollout, backward_through_replay, group_rollout, replay_energies


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


@dataclass
class GroupData:
    """One group of a step: its rollout, the values the updates of the step share, and where it came from.

    advantages ``[G]`` (float64, CPU); reward ``[G + 1]`` the weighted whole-video reward of each sequence (anchor
    last); energy_old / energy_ref ``[G, NB, K]`` the old and reference policies' energies, fixed for the step by
    :meth:`Trainer._settle_energies` (None until settled; energy_ref stays None without a reference policy).
    old_is_policy / ref_is_policy: those policies had the policy's weights when the step began.
    """

    rollout: GroupRollout
    advantages: torch.Tensor
    reward: torch.Tensor
    fork: int
    prompt_id: int
    old_is_policy: bool
    ref_is_policy: bool
    energy_old: Optional[torch.Tensor] = None
    energy_ref: Optional[torch.Tensor] = None


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
        streaming = config.streaming
        self.generator = StreamingWanGenerator(
            self.transformer,
            StreamingConfig(frames_per_block=streaming.frames_per_block, sink_frames=streaming.sink_frames,
                            window_frames=streaming.window_frames, nearest_frames=streaming.nearest_frames,
                            timesteps=tuple(streaming.timesteps), shift=streaming.shift,
                            cache_frames=streaming.cache_frames, latent_height=config.rollout.latent_height,
                            latent_width=config.rollout.latent_width),
            backend=config.model.backend)
        model_config = self.transformer.config
        self.latent_shape = (model_config.in_channels, config.rollout.latent_height, config.rollout.latent_width)
        # with LoRA (model.lora_rank) only the adapter trains
        self.trainable = lora if lora is not None else self._select_trainable(own_model=transformer is None)
        model_dtype = next(self.transformer.parameters()).dtype
        text_embeds, self.prompt_texts = (None, []) if prompt_embeds is not None else load_prompts(config, self.device)
        self.prompts = self._prompts(prompt_embeds if prompt_embeds is not None else text_embeds,
                                     model_config.text_dim).to(self.device, model_dtype)
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

        optim = config.optim
        # A bf16/fp16 model trains through fp32 master weights: AdamW steps (lr 1e-5 x O(1)) are mostly below
        # half a bf16 ulp of the weights and would round away. The model keeps the low-precision copy for the
        # forwards; the optimizer, its clipping and the EMA work on the fp32 masters.
        self.master = ([param.detach().float().clone().requires_grad_() for param in self.trainable]
                       if any(param.dtype != torch.float32 for param in self.trainable) else None)
        self.opt_params = self.master if self.master is not None else self.trainable
        self.optimizer = torch.optim.AdamW(self.opt_params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.ema = [param.detach().clone() for param in self.opt_params] if optim.ema_decay > 0 else None
        self.old = [param.detach().clone() for param in self.trainable]
        self.ref = [param.detach().clone() for param in self.trainable] if config.objective.beta != 0 else None
        # Versions tell when the old / reference weights equal the policy's, which saves their replays.
        self.version = 0          # optimizer steps taken
        self.old_version = 0      # the version the old policy was copied from
        self.step = 0             # train steps done (skipped ones included: their rollouts were consumed)
        self.rollouts = 0         # rollouts done (old-policy sync counter)
        self.metrics_path = os.path.join(config.run.output_dir, "metrics.jsonl")
        self.checkpoint_path = os.path.join(config.run.output_dir, "checkpoint.pt")

    # ---------------------------------------------------------------------------------------------- set-up helpers
    def _select_trainable(self, own_model: bool) -> List[torch.nn.Parameter]:
        """Trainable parameters: those whose name contains one of model.trainable (the rest frozen); without that
        list, all of a model built here, or the requires_grad ones of a model passed in (e.g. LoRA adapters)."""
        keys = self.config.model.trainable
        trainable = []
        for name, param in self.transformer.named_parameters():
            if keys:
                param.requires_grad_(any(key in name for key in keys))
            elif own_model:
                param.requires_grad_(True)
            if param.requires_grad:
                trainable.append(param)
        if not trainable:
            raise ValueError(f"model.trainable={keys} selects no parameter")
        return trainable

    def _prompts(self, prompt_embeds: Optional[torch.Tensor], text_dim: int) -> torch.Tensor:
        rollout_config = self.config.rollout
        if prompt_embeds is None and rollout_config.prompts_file is not None:
            prompt_embeds = torch.load(rollout_config.prompts_file, map_location="cpu")
        if prompt_embeds is None:
            rng = torch.Generator().manual_seed(self.config.run.seed + 1)
            prompt_embeds = torch.randn(rollout_config.num_prompts, rollout_config.prompt_length, text_dim,
                                        generator=rng)
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
            for index, param in enumerate(self.trainable):
                param.data, state[index] = state[index], param.data
        try:
            yield
        finally:
            with torch.no_grad():
                for index, param in enumerate(self.trainable):
                    param.data, state[index] = state[index], param.data

    def _group_rng(self, group: int) -> torch.Generator:
        # Distinct, reproducible streams per (run seed, step, global group index): independent of rank count.
        return torch.Generator().manual_seed((self.config.run.seed * 1_000_003 + self.step * 10_007 + group) % 2**63)

    # ------------------------------------------------------------------------------------------------ one step
    def _replay(self, rollout: GroupRollout, *, grad: bool) -> torch.Tensor:
        replay, rollout_config = self.config.replay, self.config.rollout
        blocks = (rollout.perturbed_blocks if replay.blocks == "perturbed"
                  else rollout_config.num_blocks - rollout.fork_block)
        with torch.set_grad_enabled(grad):
            return replay_energies(self.generator, rollout, num_blocks=blocks, grad_steps=replay.grad_steps,
                                   step_weights=self.step_weights, energy_scale=replay.energy_scale,
                                   backend=replay.energy_backend)

    def _settle_energies(self, group: GroupData, policy_energy: Optional[torch.Tensor] = None) -> None:
        """Fix the old and reference policies' energies of `group` for the whole step, replaying each only when it
        differs from the policy's.

        Called twice: right after the rollout (``policy_energy`` None, no graph alive) it replays the old policy
        (the old weights are still in place: the caller runs it inside the rollout's weight swap) and the
        reference policy when they are not the policy; in each update with the policy's replay, it takes the
        energies of those equal to the policy from the step's FIRST update (the policy before any update of the
        step), which costs no replay.
        """
        if policy_energy is None:
            if not group.old_is_policy:
                group.energy_old = self._replay(group.rollout, grad=False)
            if self.ref is not None and not group.ref_is_policy:
                with self._weights(self.ref):
                    group.energy_ref = self._replay(group.rollout, grad=False)
            return
        if group.energy_old is None:
            group.energy_old = policy_energy.detach()
        if self.ref is not None and group.energy_ref is None:
            group.energy_ref = policy_energy.detach()

    def _roll_out_group(self, group_index: int, old_is_policy: bool) -> GroupData:
        """Roll out one group with the old policy and score it: rewards, advantages, old/reference energies."""
        config, rollout_config = self.config, self.config.rollout
        rng = self._group_rng(group_index)
        prompt_id = int(torch.randint(self.prompts.shape[0], (1,), generator=rng))
        fork = int(torch.randint(rollout_config.fork_min, rollout_config.fork_max + 1, (1,), generator=rng))
        with self._weights(None if old_is_policy else self.old):
            rollout = group_rollout(self.generator, self.prompts[prompt_id:prompt_id + 1], prompt_id=prompt_id,
                                    num_blocks=rollout_config.num_blocks, fork_block=fork,
                                    perturbed_blocks=rollout_config.perturbed_blocks,
                                    num_branches=rollout_config.num_branches, num_routed=config.num_routed(),
                                    latent_shape=self.latent_shape, rng=rng, sampler=rollout_config.sampler)
            ids = torch.full((rollout_config.num_branches + 1,), prompt_id, dtype=torch.long)
            with torch.no_grad():  # one decode of the whole video serves the chunk's and the video's pixel rewards
                local, whole = self.reward_fn.score_group(rollout.video(), fork * config.streaming.frames_per_block,
                                                          ids)
                local, whole = local.double(), whole.double()
            objective = config.objective
            advantages = anchor_relative_advantages(local, whole, self.component_weights,
                                                    signal_weights=(objective.local_weight, objective.global_weight),
                                                    clamp=objective.advantage_clamp)
            group = GroupData(rollout=rollout, advantages=advantages, reward=(whole * self.component_weights).sum(1),
                              fork=fork, prompt_id=prompt_id, old_is_policy=old_is_policy,
                              ref_is_policy=self.version == 0)
            self._settle_energies(group)
        return group

    def train_step(self) -> Dict:
        """One optimizer step (or ``updates_per_rollout`` of them on one rollout); returns the step's metrics."""
        config, start = self.config, time.time()
        if self.rollouts % config.optim.old_sync_every == 0 and self.old_version != self.version:
            for old, param in zip(self.old, self.trainable):
                old.copy_(param.detach())
            self.old_version = self.version
        old_is_policy = self.old_version == self.version
        groups = local_groups(config.rollout.groups_per_step, self.dist)
        data = [self._roll_out_group(group_index, old_is_policy) for group_index in groups]
        self.rollouts += 1

        for _ in range(config.optim.updates_per_rollout):
            record = self._update(data)  # the step's metrics are those of its last update
        record.update(step=self.step + 1, time_s=time.time() - start, old_is_policy=old_is_policy,
                      local_groups=len(groups))
        self.step += 1
        return record

    def _update(self, data: List[GroupData]) -> Dict:
        """One update on the step's groups: backward of every group's loss, then the gradient step."""
        self.transformer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {key: 0.0 for key in AVERAGED_METRICS}
        for group in data:
            for key, value in self._group_loss(group).items():
                sums[key] += value
        return self._apply_gradients(sums)

    def _group_loss(self, group: GroupData) -> Dict[str, float]:
        """Backward of one group's loss / number of groups (gradients accumulate in .grad); its metric values."""
        config, rollout = self.config, group.rollout
        objective, replay = config.objective, config.replay
        temperatures = step_temperatures(rollout.sigmas.double()).to(self.device)
        # Rematerialising: energies without a graph here, as a leaf that collects dLoss/dE for the second pass.
        energy = (self._replay(rollout, grad=False).requires_grad_() if replay.rematerialize
                  else self._replay(rollout, grad=True))
        self._settle_energies(group, energy)
        logl = branch_log_likelihood(energy.double(), temperatures)
        logl_old = branch_log_likelihood(group.energy_old.double(), temperatures)
        logl_ref = (None if group.energy_ref is None
                    else branch_log_likelihood(group.energy_ref.double(), temperatures))
        advantages = group.advantages.to(self.device)
        terms = kvpo_loss(logl, logl_old, logl_ref, advantages, clip_low=objective.clip_low,
                          clip_high=objective.clip_high, beta=objective.beta)
        (terms.loss / config.rollout.groups_per_step).backward()
        if replay.rematerialize:
            backward_through_replay(self.generator, rollout, energy.grad, grad_steps=replay.grad_steps,
                                    step_weights=self.step_weights, energy_scale=replay.energy_scale,
                                    backend=replay.energy_backend)
        reward = group.reward
        values = dict(loss=terms.loss, policy_loss=terms.policy_loss, kl=terms.kl, clip_fraction=terms.clip_fraction,
                      ratio_mean=terms.ratio_mean, entropy=terms.entropy, scale=terms.scale,
                      reward_mean=reward.mean(), reward_anchor=reward[-1], reward_best=reward[:-1].max(),
                      advantage_mean=group.advantages.mean(), advantage_abs=group.advantages.abs().mean(),
                      energy_mean=energy.mean())
        metrics = {key: float(value.detach()) for key, value in values.items()}
        metrics["fork_block"] = float(group.fork)
        return metrics

    def _apply_gradients(self, sums: Dict[str, float]) -> Dict:
        """Sum gradients and metric sums over ranks, then clip and step AdamW (+ masters, EMA) unless non-finite.

        Returns the update's record: the averaged metrics, grad_norm, lr and skipped (+ skip_reason)."""
        optim, total_groups = self.config.optim, self.config.rollout.groups_per_step
        # Sum over ranks (each rank's loss was already divided by the global group count: this is the mean).
        for param in self.trainable:  # a parameter the loss does not reach still takes part in the all-reduce
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        if self.master is not None:
            for master, param in zip(self.master, self.trainable):
                master.grad = param.grad.float()
        all_reduce_sum_([param.grad for param in self.opt_params], self.dist)
        keys = list(sums)
        totals = all_reduce_scalars([sums[key] for key in keys], self.dist, self.device)
        record = {key: total / total_groups for key, total in zip(keys, totals)}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.opt_params, optim.grad_clip if optim.grad_clip > 0 else float("inf")))
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
                    torch._foreach_lerp_(self.ema, [param.detach() for param in self.opt_params],
                                         1.0 - optim.ema_decay)
        return {key: (_finite_or_none(value) if isinstance(value, float) else value) for key, value in record.items()}

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict:
        return {"step": self.step, "rollouts": self.rollouts, "version": self.version, "old_version": self.old_version,
                "model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                "master": self.master, "ema": self.ema, "old": self.old, "ref": self.ref, "rng": rng_state(),
                "config": self.config.to_dict()}

    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        """The trainable weights by name: the frozen rest (a LoRA's base model) is rebuilt from its source."""
        ids = {id(param) for param in self.trainable}
        return {name: param.detach() for name, param in self.transformer.named_parameters() if id(param) in ids}

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
        """The checkpoint and, with LoRA, the adapter in diffusers' format (``run.output_dir/lora/``, + the merged
        transformer with ``model.lora_export_merged``)."""
        if self.dist.is_main:
            save_checkpoint(path or self.checkpoint_path, self.state_dict())
            if self.config.model.lora_rank:
                from ..integrations.diffusers.lora import save_lora_adapter, save_merged

                directory = os.path.join(self.config.run.output_dir, "lora")
                save_lora_adapter(self.transformer, directory)
                if self.config.model.lora_export_merged:
                    save_merged(self.transformer, os.path.join(directory, "merged_transformer.safetensors"))
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
