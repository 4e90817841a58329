"""The training loop: rollout -> rewards -> advantages -> replay -> Gibbs-PPO update, with checkpoints and metrics.

One optimizer step (``Trainer.train_step``):

1. every ``optim.old_sync_every`` rollouts the old (rollout) policy becomes a copy of the policy;
2. each rank rolls out its share of the step's groups with the old policy (``rollout.group_rollout``), seeded by
   (run seed, step, global group index), so any number of ranks sees the same data;
3. rewards of the perturbed streaming chunk ("local") and of one clip per prompt segment over the whole video
   ("global", averaged; :func:`~kvpo_kernels.trainer.rollout.group_rewards`) -> anchor-relative advantages ``[G]``;
4. branch log-likelihoods from TVE replays: the policy's (with graph), the old policy's and the initial
   (reference) policy's (no graph; skipped when equal to the policy's): :meth:`Trainer._settle_energies`;
5. ``optim.updates_per_rollout`` times: loss per group / number of groups, backward (:meth:`Trainer._group_loss`;
   with ``replay.branch_backward_chunk_size`` n the replays and the backward take n branches at a time),
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
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .checkpoint import (checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints, remove_leftovers,
                         save_checkpoint)
from .config import FIXED_ON_RESUME, RESUMABLE, TrainConfig, _plain, config_differences, save_config
from .errors import InputTypeError, InputValueError
from .distributed import DistInfo, all_reduce_scalars, all_reduce_sum_, barrier, local_groups
from .metrics import AVERAGED_METRICS
from .model import add_configured_lora, build_decoder, build_transformer, load_prompts, resolve_device
from .objective import (anchor_is_beaten, anchor_relative_advantages, branch_log_likelihood, kvpo_loss,
                        step_temperatures)
from .rewards import CombinedReward, RewardFn, build_reward
from .rollout import (GroupRollout, PromptEntry, align_switch_frames, backward_through_replay, chunk_layout,
                      group_rewards, group_rollout, replay_energies)


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _load_prompts(path: str, where: str):
    if not os.path.isfile(path):
        raise InputValueError(f"{where}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputValueError(f"{where}: not a torch file holding a tensor [P, L, text_dim] "
                              f"({type(error).__name__})") from None


def _check_prompt_width(prompt_embeds: torch.Tensor, text_dim: int, source: str) -> torch.Tensor:
    if prompt_embeds.shape[-1] != text_dim:
        raise InputValueError(f"{source}: embeddings must be {text_dim} wide (the model's text_dim), got "
                              f"{tuple(prompt_embeds.shape)}")
    return prompt_embeds


def _check_reward_fn(reward_fn) -> None:
    names = getattr(reward_fn, "names", None)
    if not callable(reward_fn) or not isinstance(names, (tuple, list)) or not names \
            or not all(isinstance(name, str) for name in names):
        raise InputTypeError("reward_fn: must be callable(latents, prompt_ids) -> [N, len(names)] and have a "
                             f".names tuple of component names (see RewardFn), got {type(reward_fn).__name__} "
                             f"with names={names!r}")


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
    anchor_beaten: bool           # anchor protection off: a branch's raw weighted reward beats the anchor's
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
    default to 1), ``prompt_embeds`` (``[P, L, text_dim]``), ``prompt_entries`` (multi-prompt videos: a list of
    :class:`~kvpo_kernels.trainer.rollout.PromptEntry` whose segment ids index prompt_embeds; default one
    single-segment entry per embedding), ``dist`` (from :func:`init_distributed`).
    """

    def __init__(self, config: TrainConfig, *, transformer=None, reward_fn: Optional[RewardFn] = None,
                 prompt_embeds: Optional[torch.Tensor] = None, prompt_entries: Optional[List[PromptEntry]] = None,
                 dist: Optional[DistInfo] = None, allow_config_change: bool = False):
        from ..integrations.diffusers import StreamingConfig, StreamingWanGenerator

        # Every input is checked before the model is built (minutes and GBs at 1.3B).
        self.config = config.validate()
        self.allow_config_change = allow_config_change
        self.resumed_from: Optional[str] = None
        model_section = config.model
        if transformer is None and model_section.pretrained is None and model_section.causal_checkpoint is not None:
            if not os.path.isfile(model_section.causal_checkpoint):
                raise InputValueError(f"model.causal_checkpoint: no checkpoint file {model_section.causal_checkpoint}")
        known_width = model_section.text_dim if transformer is None and model_section.pretrained is None else None
        # a .txt prompts file: encoded (or read from the run's cache) before the transformer is built, the encoder freed
        text_embeds, self.prompt_texts, file_entries = (
            (None, [], None) if prompt_embeds is not None else
            load_prompts(config, resolve_device(config.run.device, dist or DistInfo())))
        if text_embeds is not None:
            prompts, prompts_source = text_embeds, f"rollout.prompts_file {config.rollout.prompts_file} (UMT5-encoded)"
        else:
            prompts, prompts_source = self._prompts(prompt_embeds, known_width)
        if reward_fn is not None:
            _check_reward_fn(reward_fn)
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
                            latent_width=config.rollout.latent_width, context_noise=streaming.context_noise,
                            context_noise_grid=streaming.context_noise_grid,
                            memory_bank_frames=streaming.memory_bank_frames,
                            bank_record_interval=streaming.bank_record_interval, bank_rule=streaming.bank_rule,
                            route_layout=streaming.route_layout),
            backend=config.model.backend)
        model_config = self.transformer.config
        self.latent_shape = (model_config.in_channels, config.rollout.latent_height, config.rollout.latent_width)
        # with LoRA (model.lora_rank) only the adapter trains
        self.trainable = lora if lora is not None else self._select_trainable(own_model=transformer is None)
        if prompts is None:
            rng = torch.Generator().manual_seed(config.run.seed + 1)
            prompts = torch.randn(config.rollout.num_prompts, config.rollout.prompt_length, model_config.text_dim,
                                  generator=rng)
        model_dtype = next(self.transformer.parameters()).dtype
        self.prompts = _check_prompt_width(prompts, model_config.text_dim, prompts_source).to(self.device, model_dtype)
        rollout_config = config.rollout
        self.chunks = chunk_layout(rollout_config.num_blocks * streaming.frames_per_block,
                                   rollout_config.streaming_chunk_size, rollout_config.streaming_min_new_frame)
        self.prompt_entries = self._prompt_entries(prompt_entries if prompt_entries is not None else file_entries)
        self.decoder = build_decoder(config, self.device)   # the Wan VAE of the pixel rewards and sample videos
        if reward_fn is None:
            reward_fn = build_reward(config.reward.components, self.latent_shape[0], config.run.seed,
                                     decoder=self.decoder, prompts=self.prompt_texts, device=self.device,
                                     offload=config.model.offload)
            weights = [float(spec.get("weight", 1.0)) for spec in config.reward.components]
        else:
            weights = [1.0] * len(reward_fn.names)
        self.reward_fn = reward_fn
        self.component_weights = torch.tensor(weights, dtype=torch.float64)
        self.step_weights = (None if config.replay.step_weights is None
                             else torch.tensor(config.replay.step_weights, dtype=torch.float32))
        self._init_training_state()
        self.metrics_path = os.path.join(config.run.output_dir, "metrics.jsonl")

    def _init_training_state(self) -> None:
        """Optimizer (on fp32 masters for a low-precision model), EMA, old / reference weights and counters."""
        optim = self.config.optim
        # A bf16/fp16 model trains through fp32 master weights: AdamW steps (lr 1e-5 x O(1)) are mostly below
        # half a bf16 ulp of the weights and would round away. The model keeps the low-precision copy for the
        # forwards; the optimizer, its clipping and the EMA work on the fp32 masters. (A float64 model, e.g. a
        # test's, trains in float64: fp32 masters would round it.)
        self.master = ([param.detach().float().clone().requires_grad_() for param in self.trainable]
                       if any(param.dtype in (torch.bfloat16, torch.float16) for param in self.trainable) else None)
        self.opt_params = self.master if self.master is not None else self.trainable
        self.optimizer = torch.optim.AdamW(self.opt_params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.ema = [param.detach().clone() for param in self.opt_params] if optim.ema_decay > 0 else None
        self.old = [param.detach().clone() for param in self.trainable]
        self.ref = [param.detach().clone() for param in self.trainable] if self.config.objective.beta != 0 else None
        # Versions tell when the old / reference weights equal the policy's, which saves their replays.
        self.version = 0          # optimizer steps taken
        self.old_version = 0      # the version the old policy was copied from
        self.step = 0             # train steps done (skipped ones included: their rollouts were consumed)
        self.rollouts = 0         # rollouts done (old-policy sync counter)

    @property
    def reward_fn(self) -> CombinedReward:
        return self._reward_fn

    @reward_fn.setter
    def reward_fn(self, reward_fn: RewardFn) -> None:
        # Any reward (also one set after construction) runs inside a CombinedReward: its pixel components share the
        # frames the run's VAE decodes once per call, and every component's output is checked.
        self._reward_fn = (reward_fn if isinstance(reward_fn, CombinedReward)
                           else CombinedReward([reward_fn], self.decoder))

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
            raise InputValueError(f"model.trainable: {keys} selects no parameter of the model")
        return trainable

    def _prompts(self, prompt_embeds: Optional[torch.Tensor],
                 text_dim: Optional[int]) -> Tuple[Optional[torch.Tensor], str]:
        """The prompt embeddings ``[P, L, text_dim]`` (argument or rollout.prompts_file; None: seeded random ones,
        drawn later), checked, and where they came from; `text_dim` None: the width is checked after the build."""
        rollout_config = self.config.rollout
        source = "prompt_embeds"
        if prompt_embeds is None and rollout_config.prompts_file is not None:
            source = f"rollout.prompts_file {rollout_config.prompts_file}"
            prompt_embeds = _load_prompts(rollout_config.prompts_file, source)
        if prompt_embeds is None:
            return None, "random prompts"  # drawn once the model (its text_dim) is known
        if not isinstance(prompt_embeds, torch.Tensor):
            raise InputTypeError(f"{source}: must hold a tensor [P, L, text_dim], got a {type(prompt_embeds).__name__}")
        if prompt_embeds.dim() != 3 or 0 in prompt_embeds.shape or not prompt_embeds.is_floating_point():
            raise InputValueError(f"{source}: must be a float tensor [P, L, text_dim] with P, L >= 1, got "
                                  f"{prompt_embeds.dtype} {tuple(prompt_embeds.shape)}")
        if not torch.isfinite(prompt_embeds).all():
            raise InputValueError(f"{source}: holds non-finite values (NaN / inf)")
        return (prompt_embeds if text_dim is None else _check_prompt_width(prompt_embeds, text_dim, source)), source

    def _prompt_entries(self, entries: Optional[List[PromptEntry]]) -> List[PromptEntry]:
        """The training prompts: each entry's segments index ``self.prompts`` (default: one single-segment entry per
        embedding); switch frames aligned to the streaming chunks when ``rollout.align_switch_to_chunk``."""
        if entries is None:
            return [PromptEntry((index,)) for index in range(self.prompts.shape[0])]
        aligned = []
        for entry in entries:
            if not isinstance(entry, PromptEntry):
                raise InputTypeError(f"prompt_entries must hold PromptEntry items, got {type(entry).__name__}")
            if any(not 0 <= index < self.prompts.shape[0] for index in entry.segment_ids):
                raise InputValueError(f"prompt_entries: segment ids {entry.segment_ids} outside the "
                                 f"{self.prompts.shape[0]} prompt embeddings")
            switches = entry.switch_frames
            if self.config.rollout.align_switch_to_chunk and switches:
                switches = tuple(align_switch_frames(switches, self.chunks))
            aligned.append(PromptEntry(entry.segment_ids, switches))
        if not aligned:
            raise InputValueError("prompt_entries must hold at least one entry")
        return aligned

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
    def _replay(self, rollout: GroupRollout, *, grad: bool, branches: Optional[range] = None) -> torch.Tensor:
        replay = self.config.replay
        with torch.set_grad_enabled(grad):  # the policy window: rollout.window_blocks
            return replay_energies(self.generator, rollout, grad_steps=replay.grad_steps,
                                   step_weights=self.step_weights, energy_scale=replay.energy_scale,
                                   energy_space=replay.energy_space, backend=replay.energy_backend,
                                   branches=branches)

    def _branch_chunks(self, num_branches: int) -> List[range]:
        """The group's branches in runs of ``replay.branch_backward_chunk_size`` (the last one shorter); one run of
        all of them when that is 0 or >= G (released ``_iter_branch_backward_chunks``)."""
        size = self.config.replay.branch_backward_chunk_size
        if size == 0 or size >= num_branches:
            return [range(num_branches)]
        return [range(start, min(start + size, num_branches)) for start in range(0, num_branches, size)]

    def _energies(self, rollout: GroupRollout) -> torch.Tensor:
        """``E [G, NB, K]`` of the current weights without a graph, replayed one branch chunk at a time."""
        return torch.cat([self._replay(rollout, grad=False, branches=branches)
                          for branches in self._branch_chunks(rollout.num_branches)])

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
                group.energy_old = self._energies(group.rollout)
            if self.ref is not None and not group.ref_is_policy:
                with self._weights(self.ref):
                    group.energy_ref = self._energies(group.rollout)
            return
        if group.energy_old is None:
            group.energy_old = policy_energy.detach()
        if self.ref is not None and group.energy_ref is None:
            group.energy_ref = policy_energy.detach()

    def _roll_out_group(self, group_index: int, old_is_policy: bool) -> GroupData:
        """Roll out one group with the old policy and score it: rewards, advantages, old/reference energies."""
        config, rollout_config = self.config, self.config.rollout
        rng = self._group_rng(group_index)
        prompt_id = int(torch.randint(len(self.prompt_entries), (1,), generator=rng))
        entry = self.prompt_entries[prompt_id]
        forks = config.fork_blocks()
        fork = forks[int(torch.randint(len(forks), (1,), generator=rng))]
        with self._weights(None if old_is_policy else self.old):
            rollout = group_rollout(self.generator, [self.prompts[i:i + 1] for i in entry.segment_ids],
                                    prompt_id=prompt_id, segment_ids=entry.segment_ids,
                                    switch_frames=entry.switch_frames, chunks=self.chunks,
                                    policy_window_frames=config.replay.policy_window_frames,
                                    num_blocks=rollout_config.num_blocks, fork_block=fork,
                                    perturbed_blocks=rollout_config.perturbed_blocks,
                                    num_branches=rollout_config.num_branches, num_routed=config.num_routed(),
                                    latent_shape=self.latent_shape, rng=rng, sampler=rollout_config.sampler)
            # self.reward_fn is a CombinedReward: it checks every component's scores itself
            local, whole = group_rewards(self.reward_fn, rollout, clip_len=config.reward.long_reward_normal_clip_len,
                                         stride=config.reward.vae_temporal_stride)
            objective = config.objective
            advantages = anchor_relative_advantages(local, whole, self.component_weights,
                                                    signal_weights=(objective.local_weight, objective.global_weight),
                                                    clamp=objective.advantage_clamp)
            group = GroupData(rollout=rollout, advantages=advantages,
                              anchor_beaten=anchor_is_beaten(local, whole, self.component_weights),
                              reward=(whole * self.component_weights).sum(1),
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

        updates = config.optim.updates_per_rollout
        # A non-finite update skips the whole step: with several updates per rollout, the earlier ones are undone
        # from a snapshot (copies of the optimized weights, AdamW state and EMA: memory of ~4 copies of the
        # trainable weights while it lives; none is taken for one update, which is checked before it applies).
        snapshot = self._snapshot() if updates > 1 else None
        for update in range(updates):
            record = self._update(data)  # the step's metrics are those of its last update
            if record["skipped"]:
                if update > 0:
                    self._restore(snapshot)
                    record["skip_reason"] += f" in update {update + 1} of {updates} (updates 1-{update} undone)"
                break
        record.update(step=self.step + 1, time_s=time.time() - start, old_is_policy=old_is_policy,
                      local_groups=len(groups))
        self.step += 1
        return record

    def _snapshot(self) -> Dict:
        clone = lambda tensors: None if tensors is None else [tensor.detach().clone() for tensor in tensors]
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {index: {key: value.clone() if torch.is_tensor(value) else value
                                            for key, value in state.items()}
                                    for index, state in optimizer_state["state"].items()}
        return {"weights": clone(self.opt_params), "optimizer": optimizer_state, "ema": clone(self.ema),
                "version": self.version}

    def _restore(self, snapshot: Dict) -> None:
        """Put back the weights, AdamW state, EMA and version of `snapshot` (the step's start)."""
        with torch.no_grad():
            for param, saved in zip(self.opt_params, snapshot["weights"]):
                param.copy_(saved)
            if self.master is not None:
                for param, master in zip(self.trainable, self.master):
                    param.copy_(master)
            for ema, saved in zip(self.ema or [], snapshot["ema"] or []):
                ema.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.version = snapshot["version"]

    def _update(self, data: List[GroupData]) -> Dict:
        """One update on the step's groups: backward of every group's loss, then the gradient step."""
        self.transformer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        # The recipe's LR schedule steps once per old-policy window (released: at each old-policy sync).
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = self.config.optim.lr_at((self.rollouts - 1) // self.config.optim.old_sync_every)
        sums = {key: 0.0 for key in AVERAGED_METRICS}
        for group in data:
            for key, value in self._group_loss(group).items():
                sums[key] += value
        # (a local hint for the skip reason: the skip decision itself is taken on all-reduced values)
        bad_reward = any(not torch.isfinite(group.reward).all() for group in data)
        return self._apply_gradients(sums, bad_reward)

    def _group_loss(self, group: GroupData) -> Dict[str, float]:
        """Backward of one group's loss / number of groups (gradients accumulate in .grad); its metric values."""
        config, rollout = self.config, group.rollout
        objective, replay = config.objective, config.replay
        temperatures = step_temperatures(rollout.sigmas.double()).to(self.device)
        chunks = self._branch_chunks(rollout.num_branches)
        # Rematerialising or branch-chunked: energies without a graph here, as a leaf that collects dLoss/dE for the
        # second pass. The loss (advantages, ratios, anchor protection, KL: all over the whole group) is evaluated
        # once; the second pass adds sum_g dLoss/dE_g dE_g/dtheta chunk by chunk, the unchunked gradient (released:
        # the whole loss again per chunk, the other branches' log-likelihoods detached: the same sum).
        two_pass = replay.rematerialize or len(chunks) > 1
        energy = self._energies(rollout).requires_grad_() if two_pass else self._replay(rollout, grad=True)
        self._settle_energies(group, energy)
        logl = branch_log_likelihood(energy.double(), temperatures)
        logl_old = branch_log_likelihood(group.energy_old.double(), temperatures)
        logl_ref = (None if group.energy_ref is None
                    else branch_log_likelihood(group.energy_ref.double(), temperatures))
        advantages = group.advantages.to(self.device)
        terms = kvpo_loss(logl, logl_old, logl_ref, advantages, anchor_beaten=group.anchor_beaten,
                          clip_low=objective.clip_low, clip_high=objective.clip_high, beta=objective.beta)
        (terms.loss / config.rollout.groups_per_step).backward()
        for branches in chunks if two_pass else ():
            self._backward_branches(rollout, energy.grad[branches.start:branches.stop], branches)
        reward = group.reward
        values = dict(loss=terms.loss, policy_loss=terms.policy_loss, kl=terms.kl, clip_fraction=terms.clip_fraction,
                      ratio_mean=terms.ratio_mean, ratio_min=terms.ratio_min, ratio_max=terms.ratio_max,
                      entropy=terms.entropy, scale=terms.scale,
                      reward_mean=reward.mean(), reward_anchor=reward[-1], reward_best=reward[:-1].max(),
                      advantage_mean=group.advantages.mean(), advantage_abs=group.advantages.abs().mean(),
                      energy_mean=energy.mean())
        metrics = {key: float(value.detach()) for key, value in values.items()}
        metrics["fork_block"] = float(group.fork)
        return metrics

    def _backward_branches(self, rollout: GroupRollout, energy_grad: torch.Tensor, branches: range) -> None:
        """Accumulate ``sum_{g in branches} energy_grad[g] . dE_g/dtheta`` into .grad: one graph of these branches'
        replay (freed by its backward), or with ``replay.rematerialize`` one (block, step) forward at a time."""
        replay = self.config.replay
        if replay.rematerialize:
            backward_through_replay(self.generator, rollout, energy_grad, grad_steps=replay.grad_steps,
                                    step_weights=self.step_weights, energy_scale=replay.energy_scale,
                                    energy_space=replay.energy_space, backend=replay.energy_backend,
                                    branches=branches)
        else:
            torch.autograd.backward(self._replay(rollout, grad=True, branches=branches), energy_grad)

    def _apply_gradients(self, sums: Dict[str, float], bad_reward: bool = False) -> Dict:
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
            record["skip_reason"] = ("non-finite reward (reward_fn returned NaN / inf)" if bad_reward else
                                     "non-finite loss" if not math.isfinite(record["loss"]) else "non-finite gradient")
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
                "master": self.master, "ema": self.ema, "old": self.old, "ref": self.ref,
                "config": _plain(self.config.to_dict())}

    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        """The trainable weights by name: the frozen rest (a LoRA's base model) is rebuilt from its source."""
        ids = {id(param) for param in self.trainable}
        return {name: param.detach() for name, param in self.transformer.named_parameters() if id(param) in ids}

    def load_state_dict(self, state: Dict, where: str = "checkpoint") -> None:
        mine = self._trainable_state()
        if set(state["model"]) != set(mine):
            raise InputValueError(f"{where}: does not fit this model (trainable weights differ: "
                                  f"{sorted(set(state['model']) ^ set(mine))[:4]}); model geometry and model.trainable "
                                  "must match the checkpoint's, and so must model.lora_rank / lora_targets")
        try:
            with torch.no_grad():
                for name, tensor in state["model"].items():
                    mine[name].copy_(tensor)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:  # shapes / parameter count of another geometry or selection
            raise InputValueError(f"{where}: does not fit this model ({' '.join(str(error).split())[:300]}); "
                                  "model geometry and model.trainable must match the checkpoint's") from None
        for name in ("master", "ema", "old", "ref"):
            mine, saved = getattr(self, name), state[name]
            if (mine is None) != (saved is None):
                raise InputValueError(f"{where}: {name} state present in only one of the checkpoint and the config "
                                      "(optim.ema_decay / objective.beta switched on or off)")
            if mine is not None:
                with torch.no_grad():
                    for dst, src in zip(mine, saved):
                        dst.copy_(src)
        # The optimizer's hyper-parameters come from the config, not the checkpoint: an allowed config change
        # (allow_config_change) is applied for real.
        optim = self.config.optim
        for param_group in self.optimizer.param_groups:
            param_group.update(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.step, self.rollouts = state["step"], state["rollouts"]
        self.version, self.old_version = state["version"], state["old_version"]

    def save(self, path: Optional[str] = None) -> None:
        """Write the training state to `path` (default: output_dir/checkpoint-<step>.pt), keeping the newest two;
        with LoRA also the adapter in diffusers' format (``output_dir/lora/``, + the merged transformer with
        ``model.lora_export_merged``)."""
        if self.dist.is_main:
            save_checkpoint(path or checkpoint_path(self.config.run.output_dir, self.step), self.state_dict())
            if path is None:
                prune_checkpoints(self.config.run.output_dir)
            if self.config.model.lora_rank:
                from ..integrations.diffusers.lora import save_lora_adapter, save_merged

                directory = os.path.join(self.config.run.output_dir, "lora")
                save_lora_adapter(self.transformer, directory)
                if self.config.model.lora_export_merged:
                    save_merged(self.transformer, os.path.join(directory, "merged_transformer.safetensors"))
        barrier(self.dist)

    def resume(self, path: Optional[str] = None) -> bool:
        """Load `path` (default: the newest checkpoint of output_dir); False when there is none.

        The checkpoint's config must equal this one except in RESUMABLE keys; other differences raise, listing
        them, unless ``allow_config_change`` (then they are applied and logged as a ``config_change`` row)."""
        found = list_checkpoints(self.config.run.output_dir)
        if path is None and not found:
            return False
        path = path or found[-1]
        previous = next((other for other in reversed(found) if other != path), None)
        # Loaded on the CPU: load_state_dict / copy_ move the tensors to the live ones' device without a second
        # copy of the whole training state (model, optimizer, masters, EMA, old and reference weights) on the GPU.
        state = load_checkpoint(path, map_location="cpu", previous=previous)
        changes = config_differences(state["config"], _plain(self.config.to_dict()))
        fixed = {key: change for key, change in changes.items() if key in FIXED_ON_RESUME}
        other = {key: change for key, change in changes.items() if key not in RESUMABLE and key not in fixed}
        if fixed or (other and not self.allow_config_change):
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in {**fixed, **other}.items())
            hint = ("these define the trained state and cannot change on resume" if fixed else
                    "pass --allow-config-change (allow_config_change=True) to apply them")
            raise InputValueError(f"resume from {path}: the config differs from the checkpoint's: {listed}; {hint}, "
                                  "or --fresh to start over")
        self.load_state_dict(state, where=f"checkpoint {path}")
        self.resumed_from = path
        if other:
            self._log({"event": "config_change", "at_step": self.step,
                       "changes": {key: list(change) for key, change in other.items()}})
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

    def _prepare_output_dir(self) -> List[str]:
        """Remove what a killed save left; without run.resume, move an earlier run's files aside (never mixed).
        Returns the names of the removed leftovers."""
        output_dir = self.config.run.output_dir
        os.makedirs(output_dir, exist_ok=True)
        leftovers = remove_leftovers(output_dir)
        if not self.config.run.resume:
            earlier = [os.path.join(output_dir, name) for name in ("metrics.jsonl", "config.yaml", "metrics.png")]
            earlier = [path for path in earlier if os.path.exists(path)]
            earlier += [path for checkpoint in list_checkpoints(output_dir) for path in (checkpoint,
                                                                                      checkpoint + ".sha256")]
            if earlier:
                aside = os.path.join(output_dir, time.strftime("previous-%Y%m%dT%H%M%S", time.gmtime()))
                os.makedirs(aside, exist_ok=False)
                for path in earlier:
                    os.replace(path, os.path.join(aside, os.path.basename(path)))
        return leftovers

    def train(self, steps: Optional[int] = None, callback: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
        """Run until ``steps`` (default run.steps) train steps are done; returns this call's step records.

        Resumes from the newest checkpoint (run.resume), and metrics.jsonl is made to match it: rows of steps after
        the checkpoint are dropped, then written again as those steps are redone, so each step has one row."""
        config = self.config
        total = config.run.steps if steps is None else steps
        leftovers = self._prepare_output_dir() if self.dist.is_main else []
        barrier(self.dist)
        resumed = config.run.resume and self.resume()
        if self.dist.is_main:
            truncate_metrics(self.metrics_path, self.step)
            save_config(config, os.path.join(config.run.output_dir, "config.yaml"))
            if resumed:
                print(f"kvpo-train: resumed from step {self.step} of {total} ({self.resumed_from})", flush=True)
        self._log({"event": "start", "resumed_at": self.step if resumed else None, "of_steps": total,
                   "removed_leftovers": leftovers, "world_size": self.dist.world_size, "device": str(self.device)})
        records = []
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(self.step, total), desc="kvpo-train", unit="step",
                   disable=not (config.run.progress and self.dist.is_main), dynamic_ncols=True)
        every = config.run.checkpoint_every
        while self.step < total:
            record = self.train_step()
            if config.run.sample_every and (self.step % config.run.sample_every == 0 or self.step == total):
                self._sample(record)
            records.append(record)
            self._log(record)
            if callback is not None:
                callback(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.4f}" if record["reward_mean"] is not None else "nan",
                            loss=f"{record['loss']:.3g}" if record["loss"] is not None else "nan",
                            **({"skipped": "yes"} if record["skipped"] else {}))
            # A skipped step left the weights, optimizer, EMA and version as they were: its checkpoint is the
            # state before it with the step counted (its rollout was consumed), so saving it loses nothing.
            if every and self.step % every == 0:
                self.save()
        bar.close()
        if records and not (every and self.step % every == 0):
            self.save()
        return records


def truncate_metrics(path: str, step: int) -> None:
    """Drop the step rows of steps after `step` (and a torn last line) from metrics.jsonl, atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut short by a kill
                continue
            if row.get("step", 0) <= step:
                kept.append(json.dumps(row) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
