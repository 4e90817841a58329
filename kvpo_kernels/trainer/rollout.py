"""Group rollouts (G routed branches + one anchor, batched), their TVE replay, prompt segments and reward windows.

Rollout of one group (one prompt entry), all under ``torch.no_grad()`` with the old policy's weights:

    prefix  blocks 0 .. fork-1      batch 1, generated once, committed into a cache (the pre-fork snapshot)
    fork    cache.fork(G + 1)       no K/V copy: every branch maps the prefix's blocks
    chunk   blocks fork .. end      G + 1 sequences in ONE batch; the first P blocks routed (branch g: route g,
                                    anchor: its default window), the rest unperturbed; the same initial and
                                    re-noising noise for every sequence, so only the routing differs

Routes come from the generator's pool (``route_pool``) and count (``num_routed``) of its ``route_layout``: absolute
frames read with the sink ("sink"), or the released MemFlow plan's cache slots, read without a sink and translated
by the cache into the frames each perturbed block reads ("memflow", ``GroupKVCache.route_frames``).

Prompt segments (LongLive's multi-prompt long video). A prompt entry holds S segments and S - 1 switch frames; a
block starting at or after switch i cross-attends to segment i + 1. Before the first block of a new segment the
window is re-encoded under it (:meth:`StreamingWanGenerator.recache`; the sink is global), in the prefix cache
or, after the fork, batched over the G + 1 sequences, each with its own video. In a prompts text file an entry is
one line, segments and switch frames (absolute latent frames) alternating, separated by ``||``::

    a red fox runs through snow || 39 || the fox stops at a frozen lake || 75 || it looks up at the moon

(:func:`parse_prompt_line`; :func:`prompt_entries_from_lines` turns a file into segment texts + entries). With
``align_switch_to_chunk`` a switch moves to the first streaming-chunk start at or after it (released: 39, 75, 111
on chunks [0, 21), [21, 39), [39, 57), ...).

Streaming chunks (released ``streaming_chunk_size`` 21, ``streaming_min_new_frame`` 18): the video is cut into
``[0, chunk_size)`` then pieces of ``min_new_frame`` frames (:func:`chunk_layout`); the perturbed chunk is the one
holding the fork. Policy window (released ``policy_window_frames``, 0 = auto): the replayed blocks start at the
fork block and cover the rest of the perturbed chunk (released: the recorded trajectory of the perturbed chunk;
with P = 5 and 18-frame chunks, 5 or 6 blocks); a positive value asks for that many frames from the fork,
rounded up to whole blocks, at least the P perturbed ones, at most to the end of the video.

Replay of the G branches (the anchor is only a reward baseline): from the pre-fork snapshot forked into G sequences,
routing off, the policy predicts x0 at each recorded noisy input x_t; the trajectory energy of step k is

    "x0" (default; released kvpo.py _compute_trajectory_log_prob):  E[g, b, k] = w_k * mean_j (x0_theta - x0_rollout)^2
    "velocity" (option):  E[g, b, k] = w_k * mean_j (v_theta - v_rollout)^2 = w_k / sigma_k^2 * (the x0 residual)

(v = (x_t - x0) / sigma at the same x_t; w_k = energy_scale * step weight), computed by
:func:`kvpo_kernels.velocity_energy` for all K steps of a block at once (``replay.energy_space`` selects the form).
Replay context (released): each replayed block's history for the next one is the REPLAYING policy's
own last-step x0, committed as the rollout commits (timestep ``context_noise``, the rollout's own commit noise), not
the rollout's clean block; so a replay by the rollout policy reproduces the rollout exactly. (The released code
draws fresh commit noise in the replay, also at context_noise 0, where its scheduler's lookup still mixes in
0.005 eps: ``streaming.context_noise_grid``, set by the 1.3B presets. Without the grid, 0 commits x0 itself.)
MemFlow: the replay records no new bank frame (released: ``update_bank=False``), so a replay whose window holds a
record block reads another bank than its rollout did, as in the released code.
With ``rematerialize``, :func:`backward_through_replay` trades one extra forward per gradient step for holding only
one forward's activations. Both replay functions take ``branches`` (a contiguous range of the G): a branch's replay
reads only its own history, so the trainer can replay and back-propagate the group a chunk of branches at a time
(``replay.branch_backward_chunk_size``).

Rewards (released windows, :func:`group_rewards`). A :class:`~kvpo_kernels.trainer.rewards.RewardFn` is called with
clean latents ``[G + 1, C, F', H, W]`` (anchor last) and ``prompt_ids [G + 1]``, the id of the segment's prompt
(:attr:`GroupRollout.segment_ids`). Local: the whole perturbed chunk (incl. its frames before the fork), with the
fork's segment. Global: one clip per segment over the full video, then the mean over segments. A clip is
``long_reward_normal_clip_len`` (36) pixel frames centred in the segment's pixel range (latent frame l >= 1 decodes
to pixels ``4l - 3 .. 4l`` at ``vae_temporal_stride`` 4; latent 0 to pixel 0; a video of F latents has 4F - 3
pixels), shifted inside the video; the reward sees the latent frames that decode to it (:func:`latent_clip`).
Segments shorter than 2 pixel frames are skipped, as released.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .. import velocity_energy
from ..routing import chr_routes, uniform_routes
from .config import chunk_layout

SAMPLERS = {"chr": chr_routes, "uniform": uniform_routes}
SEGMENT_SEPARATOR = "||"


def parse_prompt_line(line: str) -> Tuple[List[str], List[int]]:
    """``"text one || 39 || text two"`` -> ``(["text one", "text two"], [39])``: segments and switch frames.

    Switch frames are absolute latent frames, strictly increasing and > 0; a line without separators is one segment.
    """
    parts = [part.strip() for part in str(line).split(SEGMENT_SEPARATOR)]
    texts, frames = parts[0::2], parts[1::2]
    if len(parts) % 2 == 0 or any(not text for text in texts):
        raise ValueError(f"prompt line {line!r}: expected 'text || frame || text || ...' (a segment on each end, "
                         f"a switch frame between two segments)")
    try:
        switches = [int(frame) for frame in frames]
    except ValueError:
        raise ValueError(f"prompt line {line!r}: switch frames must be integers, got {frames}") from None
    if any(b <= a for a, b in zip([0] + switches, switches)):
        raise ValueError(f"prompt line {line!r}: switch frames must be increasing and > 0, got {switches}")
    return texts, switches


@dataclass(frozen=True)
class PromptEntry:
    """One training prompt: ``segment_ids`` index the trainer's segment embeddings (and are what a RewardFn
    receives as prompt ids); ``switch_frames``: the ``len(segment_ids) - 1`` latent frames where segments start."""

    segment_ids: Tuple[int, ...]
    switch_frames: Tuple[int, ...] = ()

    def __post_init__(self):
        if not self.segment_ids or len(self.switch_frames) != len(self.segment_ids) - 1:
            raise ValueError(f"PromptEntry: {len(self.segment_ids)} segments need {len(self.segment_ids) - 1} "
                             f"switch frames, got {list(self.switch_frames)}")


def prompt_entries_from_lines(lines: Sequence[str]) -> Tuple[List[str], List[PromptEntry]]:
    """A prompts text file's lines (blank ones skipped) -> ``(texts, entries)``: the distinct segment texts in order
    of first appearance (encode them into the trainer's prompt embeddings, row i = text i) and one
    :class:`PromptEntry` per line whose segment ids index ``texts`` (the ids a RewardFn receives)."""
    texts, index, entries = [], {}, []
    for line in lines:
        if not str(line).strip():
            continue
        segments, switches = parse_prompt_line(line)
        ids = []
        for text in segments:
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            ids.append(index[text])
        entries.append(PromptEntry(tuple(ids), tuple(switches)))
    if not entries:
        raise ValueError("prompt lines: no prompt (every line is blank)")
    return texts, entries


def align_switch_frames(switch_frames: Sequence[int], chunks: Sequence[Tuple[int, int]]) -> List[int]:
    """Each switch moved to the first chunk start at or after it (the last chunk's start when none), as released;
    raises when two switches fall on the same chunk start."""
    starts = [start for start, _ in chunks[1:]] or [chunks[0][0]]
    aligned = [next((start for start in starts if start >= frame), starts[-1]) for frame in switch_frames]
    if any(b <= a for a, b in zip(aligned, aligned[1:])) or any(frame <= 0 for frame in aligned):
        raise ValueError(f"switch_frames {list(switch_frames)} align to chunk starts {aligned}: not increasing "
                         f"(two switches in one chunk, or one in the first)")
    return aligned


def policy_window(fork_frame: int, perturbed_blocks: int, chunks: Sequence[Tuple[int, int]], frames_per_block: int,
                  num_frames: int, policy_window_frames: int = 0) -> int:
    """Blocks replayed from the fork block on (module docstring): 0 = auto, to the end of the perturbed chunk."""
    f = frames_per_block
    if policy_window_frames > 0:
        end = fork_frame + max(-(-policy_window_frames // f) * f, perturbed_blocks * f)
    else:
        end = next(stop for start, stop in chunks if start <= fork_frame < stop)
    return max(perturbed_blocks, -(-(min(end, num_frames) - fork_frame) // f))


def latent_clip(pixel_start: int, pixel_end: int, stride: int) -> Tuple[int, int]:
    """Latent frames ``[a, b)`` that decode to pixel frames ``[pixel_start, pixel_end)`` (latent 0 -> pixel 0,
    latent l >= 1 -> pixels ``stride * l - stride + 1 .. stride * l``)."""
    def latent_of(pixel):
        return (pixel + stride - 1) // stride
    return latent_of(pixel_start), latent_of(pixel_end - 1) + 1


def global_reward_clips(num_frames: int, switch_frames: Sequence[int], clip_len: int,
                        stride: int) -> List[Tuple[int, int, int]]:
    """``[(segment, latent_start, latent_end)]``: one ``clip_len``-pixel clip centred in each segment (released
    ``_build_global_segment_clip_specs``: pixel boundaries ``[0, stride * s - stride + 1 ..., pixels)``, segments
    under 2 pixel frames skipped, the clip shifted to fit in the video)."""
    pixels = stride * num_frames - stride + 1
    bounds = [0] + [p for p in (stride * s - stride + 1 for s in switch_frames) if 0 < p < pixels] + [pixels]
    clips = []
    for segment, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi - lo < 2:
            continue
        start = max(0, (lo + hi) // 2 - clip_len // 2)
        end = min(pixels, start + clip_len)
        start = max(0, end - clip_len)
        clips.append((segment,) + latent_clip(start, end, stride))
    return clips


@dataclass
class GroupRollout:
    """One group's rollout. G branches then the anchor (index G) along every batch dimension.

    prefix_cache: the pre-fork snapshot (batch 1, blocks ``0 .. fork_block - 1`` committed).
    prefix: ``[1, C, fork_block * f, H, W]`` clean prefix latents.
    chunk: ``[G + 1, C, (num_blocks - fork_block) * f, H, W]`` clean latents from the fork to the end.
    x_t, x0_pred: ``[NC, K, G + 1, C, f, H, W]`` the noisy input and the predicted x0 of every chunk block (NC of
    them), step and sequence. commit_noise: ``[NC, 1, C, f, H, W]`` each chunk block's commit noise (None when
    the commit's ``context_sigma`` is 0). routes: the G branch routes (absolute frame indices; with
    ``route_layout="memflow"`` the released plan's cache slots, which each perturbed block reads as
    ``GroupKVCache.route_frames``). sigmas: ``[K]``.
    prompt_embeds: the segments' ``[1, L_s, D]``; segment_ids: their ids (rewards' prompt ids); switch_frames:
    where segments 1.. start (aligned). prompt_id: index of the prompt entry. perturbed_chunk: ``(start, end)``
    frames of the streaming chunk holding the fork; window_blocks: blocks the replay covers from the fork.
    """
    fork_block: int
    perturbed_blocks: int
    prefix_cache: object
    prefix: torch.Tensor
    chunk: torch.Tensor
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    routes: List[List[int]]
    sigmas: torch.Tensor
    prompt_embeds: List[torch.Tensor]
    prompt_id: int
    segment_ids: List[int]
    switch_frames: List[int] = field(default_factory=list)
    perturbed_chunk: Tuple[int, int] = (0, 0)
    window_blocks: int = 1
    commit_noise: Optional[torch.Tensor] = None

    @property
    def num_branches(self) -> int:
        return self.chunk.shape[0] - 1

    def segment_at(self, frame: int) -> int:
        """Index of the segment that frame ``frame`` belongs to."""
        return bisect.bisect_right(self.switch_frames, frame)

    def video(self) -> torch.Tensor:
        """``[G + 1, C, F, H, W]``: the whole video of every sequence (shared prefix + its own chunk)."""
        return torch.cat([self.prefix.expand(self.chunk.shape[0], -1, -1, -1, -1), self.chunk], dim=2)


def block_noise(generator: torch.Generator, num_steps: int, shape: Sequence[int]) -> List[torch.Tensor]:
    """``num_steps`` CPU float32 tensors of ``shape``: the initial noise, then the re-noising noise of steps 1..K-1
    (and, when the commit is noised, the commit noise last).

    Drawn on the CPU from a seeded generator so that a rollout is the same on any device and any number of ranks.
    """
    return [torch.randn(tuple(shape), generator=generator) for _ in range(num_steps)]


def _check_segments(prompt_embeds, switch_frames, frames_per_block: int, num_frames: int) -> List[torch.Tensor]:
    segments = [prompt_embeds] if isinstance(prompt_embeds, torch.Tensor) else list(prompt_embeds)
    switches = list(switch_frames)
    if len(segments) != len(switches) + 1:
        raise ValueError(f"switch_frames: {len(segments)} prompt segments need {len(segments) - 1} switch frames, "
                         f"got {switches}")
    if any(s % frames_per_block or not 0 < s < num_frames for s in switches):
        raise ValueError(f"switch_frames must be block starts (multiples of {frames_per_block}) inside the video "
                         f"(0, {num_frames}), got {switches} (align them to chunks, or move them)")
    return segments


@torch.no_grad()
def group_pool_blocks(cfg, num_branches: int, chunk_blocks: int, window_blocks: int, switches: bool) -> int:
    """Pool blocks (frames) one group rollout and its replays need at their peak, so the pool is sized once.

    Growing on demand would double the pool, copying it with old and new alive (at the 1.3B geometry, 287 MB per
    frame). cfg: the generator's :class:`StreamingConfig`; chunk_blocks: blocks generated after the fork;
    window_blocks: the replayed policy window. Peak of the rollout: the pre-fork snapshot (at most ``cache_frames``,
    kept for the replays) plus, per sequence of the G + 1, its private frames: what it wrote after the fork, of
    which eviction keeps at most ``cache_frames - sink_frames`` (evicted blocks return to the free list and are
    reused). Peak of a replay (the rollout's branches are released by then): the snapshot plus the G branches'
    committed blocks, all held by the per-block snapshots of the replay. A prompt switch re-encodes the window into
    fresh blocks before it frees the old ones (MemFlow: up to ``window_frames`` frames, LongLive ``window - sink``):
    room for that once per sequence. MemFlow's bank: every sequence and the snapshot hold ``memory_bank_frames``
    slot blocks and one pending block, copies of the frames (the released per-layer ``kv_bank`` and ``k_new``):
    ``(G + 2) (S + 1)`` in the rollout; in a replay each commit of a full bank copies the G branches' S slots
    anew (copy on write: the per-block snapshot keeps the old ones, the pending block stays shared).
    """
    f, sequences, size = cfg.frames_per_block, num_branches + 1, cfg.memory_bank_frames
    rollout = sequences * min(cfg.cache_frames - cfg.sink_frames, f * chunk_blocks)
    replay = num_branches * f * window_blocks
    recached = cfg.window_frames if size else cfg.window_frames - cfg.sink_frames
    recache = sequences * recached if switches else 0
    if size:
        rollout += (sequences + 1) * (size + 1)
        replay += size + 1 + (window_blocks - 1) * num_branches * size
    return cfg.cache_frames + max(rollout, replay) + recache


def group_rollout(gen, prompt_embeds, *, prompt_id: int, num_blocks: int, fork_block: int,
                  perturbed_blocks: int, num_branches: int, num_routed: int, latent_shape: Sequence[int],
                  rng: torch.Generator, sampler: str = "chr", segment_ids: Optional[Sequence[int]] = None,
                  switch_frames: Sequence[int] = (), chunks: Optional[Sequence[Tuple[int, int]]] = None,
                  policy_window_frames: int = 0) -> GroupRollout:
    """Roll out one group with the generator's current weights (the caller swaps in the old policy).

    gen: a :class:`~kvpo_kernels.integrations.diffusers.StreamingWanGenerator`; prompt_embeds ``[1, L, D]`` or a
    list of S segments ``[1, L_s, D]`` with ``switch_frames`` (S - 1 block starts, already aligned) and
    ``segment_ids`` (default ``[prompt_id]`` for one segment); latent_shape ``(C, H, W)``; rng: CPU generator for
    the routes and every noise tensor; chunks: the streaming chunks (default one chunk, the whole video);
    policy_window_frames: see :func:`policy_window`.
    """
    cfg = gen.config
    f, steps = cfg.frames_per_block, len(gen.sigmas)
    segments = _check_segments(prompt_embeds, switch_frames, f, num_blocks * f)
    segment_ids = [prompt_id] if segment_ids is None and len(segments) == 1 else list(segment_ids or [])
    if len(segment_ids) != len(segments):
        raise ValueError(f"segment_ids: one id per prompt segment ({len(segments)}), got {segment_ids}")
    chunks = chunk_layout(num_blocks * f, 0, 0) if chunks is None else list(chunks)
    fork_frame = fork_block * f
    perturbed_chunk = next(c for c in chunks if c[0] <= fork_frame < c[1])
    window = policy_window(fork_frame, perturbed_blocks, chunks, f, num_blocks * f, policy_window_frames)
    inside = [s for s in switch_frames if fork_frame < s < fork_frame + window * f]
    if inside:
        raise ValueError(f"switch_frames {inside} fall inside the policy window (frames {fork_frame} .. "
                         f"{fork_frame + window * f}): the replay runs one segment (align switches to chunks)")
    rollout = _generate_group(gen, segments, list(switch_frames), num_blocks, fork_block, perturbed_blocks,
                              num_branches, num_routed, latent_shape, rng, sampler, steps, window)
    return GroupRollout(fork_block=fork_block, perturbed_blocks=perturbed_blocks, sigmas=gen.sigmas.detach().float()
                        .cpu(), prompt_embeds=segments, prompt_id=prompt_id, segment_ids=segment_ids,
                        switch_frames=list(switch_frames), perturbed_chunk=perturbed_chunk, window_blocks=window,
                        **rollout)


def _generate_group(gen, segments, switches, num_blocks, fork_block, perturbed_blocks, num_branches, num_routed,
                    latent_shape, rng, sampler, steps, window) -> dict:
    cfg = gen.config
    f = cfg.frames_per_block
    channels, height, width = latent_shape
    param = next(gen.transformer.parameters())
    device, dtype = param.device, param.dtype
    shape = (1, channels, f, height, width)
    noised_commit = cfg.context_sigma > 0
    noises = [block_noise(rng, steps + noised_commit, shape) for _ in range(num_blocks)]

    def to_device(tensors, batch):
        return [t.to(device=device, dtype=dtype).expand(batch, -1, -1, -1, -1) for t in tensors]

    recache_at = set(switches)

    def run_block(cache, block, batch, history, routes=None):
        """One block of every sequence of `cache`, re-encoding the window first at a switch."""
        if block * f in recache_at:
            gen.recache(cache, history(), segments[bisect.bisect_right(switches, block * f)])
        embeds = segments[bisect.bisect_right(switches, block * f)].expand(batch, -1, -1)
        noise = to_device(noises[block], batch)
        return gen.generate_block(cache, block, noise[0], embeds, step_noise=noise[1:steps], routes=routes,
                                  commit_noise=noise[steps] if noised_commit else None,
                                  before_switch=(block + 1) * f in switches)

    cache = gen.new_cache(1, reserve_blocks=group_pool_blocks(cfg, num_branches, num_blocks - fork_block,
                                                              window, bool(switches)))
    prefix = []
    for block in range(fork_block):
        prefix.append(run_block(cache, block, 1, lambda: torch.cat(prefix, dim=2)).x0)
    prefix = torch.cat(prefix, dim=2) if prefix else segments[0].new_zeros((1, channels, 0, height, width))
    if fork_block * f in switches:  # the pre-fork snapshot (which the replay starts from) holds the re-encode
        gen.recache(cache, prefix, segments[bisect.bisect_right(switches, fork_block * f)])
        recache_at.discard(fork_block * f)

    pool = gen.route_pool(cache, fork_block, perturbed_blocks)
    routes = SAMPLERS[sampler](pool, num_branches, num_routed, generator=rng)
    batch = num_branches + 1
    branches = cache.fork(batch)
    chunk, x_t, x0_pred = [], [], []
    for block in range(fork_block, num_blocks):
        block_routes = routes + [None] if block < fork_block + perturbed_blocks else None
        out = run_block(branches, block, batch, lambda: torch.cat([prefix.expand(batch, -1, -1, -1, -1)] + chunk,
                                                                  dim=2), block_routes)
        chunk.append(out.x0)
        x_t.append(out.x_t)
        x0_pred.append(out.x0_pred)
    commit_noise = (torch.stack([noises[b][steps] for b in range(fork_block, num_blocks)]).to(device, dtype)
                    if noised_commit else None)
    return dict(prefix_cache=cache, prefix=prefix, chunk=torch.cat(chunk, dim=2), x_t=torch.stack(x_t),
                x0_pred=torch.stack(x0_pred), routes=routes, commit_noise=commit_noise)


ENERGY_SPACES = ("x0", "velocity")


def branch_rows(rollout: GroupRollout, branches: Optional[range]) -> slice:
    """The batch rows of ``branches`` (a contiguous ``range(start, stop)`` of the G branches; None: all of them)."""
    G = rollout.num_branches
    if branches is None:
        return slice(0, G)
    if not isinstance(branches, range) or branches.step != 1 or not 0 <= branches.start < branches.stop <= G:
        raise ValueError(f"branches must be a non-empty range(start, stop) inside range({G}), got {branches!r}")
    return slice(branches.start, branches.stop)


def _replay_setup(gen, rollout: GroupRollout, num_blocks: int, step_weights, energy_scale, energy_space,
                  rows: slice):
    """sigmas [K], per-step energy weights [K], one cache per replayed block, prompt embeds [n, L, D], and the
    policy's own last-step x0 of each block ``[NB]`` of ``[n, C, f, H, W]`` (no graph), for the n branches of
    ``rows`` (:func:`branch_rows`). A branch's replay reads only its own history, so a subset of the branches
    replays to the same values as in the whole group (up to the rounding of a different batch size).

    The replay context (module docstring): block i + 1 reads the policy's own x0 of block i, committed. Every commit
    happens here, before any graph-recording forward: a commit writes the shared K/V pool in place, which would
    invalidate the pool tensors that an earlier block's forward saved for backward. So this pass predicts each
    block's last step (no graph) and commits it; cache i is a snapshot (``select``: shared blocks, no copy) of the
    branches' history right before block i.
    """
    n, steps = rows.stop - rows.start, rollout.sigmas.numel()
    device = next(gen.transformer.parameters()).device
    sigmas = rollout.sigmas.to(device)
    weights = torch.ones(steps, device=device) if step_weights is None else step_weights.to(device)
    if energy_space not in ENERGY_SPACES:
        raise ValueError(f"energy_space must be one of {ENERGY_SPACES}, got {energy_space!r}")
    weights = energy_scale * weights
    if energy_space == "velocity":  # at the same x_t the velocity residual is the x0 residual divided by sigma
        weights = weights / sigmas.square()
    embeds = rollout.prompt_embeds[rollout.segment_at(rollout.prefix.shape[2])].expand(n, -1, -1)
    cache, caches, last = rollout.prefix_cache.fork(n), [], []
    with torch.no_grad():
        for i in range(num_blocks):
            block = rollout.fork_block + i
            caches.append(cache.select(range(n)) if i + 1 < num_blocks else cache)
            last.append(gen.predict_x0(cache, block, rollout.x_t[i, steps - 1, rows], sigmas[steps - 1], embeds))
            if i + 1 < num_blocks:
                noise = None if rollout.commit_noise is None else rollout.commit_noise[i].expand(n, -1, -1, -1, -1)
                # MemFlow: the released replay runs every forward with update_bank=False (trainer/kvpo.py
                # l. 2043-2056): its bank records no new frame (a no-op without a bank).
                gen.commit_block(cache, block, last[-1], embeds, commit_noise=noise, record_bank=False)
    return sigmas, weights, caches, embeds, last


def _check_blocks(rollout: GroupRollout, num_blocks: Optional[int]) -> int:
    num_blocks = rollout.window_blocks if num_blocks is None else num_blocks
    if not 1 <= num_blocks <= rollout.x_t.shape[0]:
        raise ValueError(f"num_blocks must be in [1, {rollout.x_t.shape[0]}] (the chunk's blocks), got {num_blocks}")
    return num_blocks


def replay_energies(gen, rollout: GroupRollout, *, num_blocks: Optional[int] = None, grad_steps: int,
                    step_weights: Optional[torch.Tensor] = None, energy_scale: float = 1.0,
                    energy_space: str = "x0", backend: str = "auto",
                    branches: Optional[range] = None) -> torch.Tensor:
    """Trajectory energies ``E [n, NB, K]`` (x0 or velocity residual: ``energy_space``) of the n branches of
    ``branches`` (a contiguous range; default all G) under the generator's current weights.

    Replays the first ``num_blocks`` chunk blocks (default: the policy window, ``rollout.window_blocks``) with
    routing off from the pre-fork snapshot, each block reading the policy's own earlier x0 (module docstring).
    Autograd records the first ``grad_steps`` steps of each block when grad mode is on; the later steps are
    computed without a graph (they still count in E, they just pass no gradient). step_weights ``[K]`` (default 1)
    and energy_scale multiply each step's energy (with ``energy_space="velocity"`` also 1 / sigma_k^2).
    """
    steps, rows = rollout.sigmas.numel(), branch_rows(rollout, branches)
    num_blocks = _check_blocks(rollout, num_blocks)
    sigmas, weights, caches, embeds, last = _replay_setup(gen, rollout, num_blocks, step_weights, energy_scale,
                                                          energy_space, rows)
    energies = []
    for i, cache in enumerate(caches):
        block = rollout.fork_block + i
        preds = []
        for k in range(steps):
            grad = torch.is_grad_enabled() and k < grad_steps
            if k == steps - 1 and not grad:  # the setup's prediction: same weights, same input, same history
                preds.append(last[i])
                continue
            with torch.set_grad_enabled(grad):
                preds.append(gen.predict_x0(cache, block, rollout.x_t[i, k, rows], sigmas[k], embeds))
        pred = torch.stack(preds, dim=1)                                  # [n, K, C, f, H, W]
        target = rollout.x0_pred[i, :, rows].transpose(0, 1)              # [n, K, C, f, H, W]
        energies.append(velocity_energy(pred, target, weights, reduction="mean", backend=backend))
    return torch.stack(energies, dim=1)                                   # [n, NB, K]


def backward_through_replay(gen, rollout: GroupRollout, energy_grad: torch.Tensor, *, grad_steps: int,
                            step_weights: Optional[torch.Tensor] = None, energy_scale: float = 1.0,
                            energy_space: str = "x0", backend: str = "auto",
                            branches: Optional[range] = None) -> None:
    """Accumulate ``sum_{g,b,k} energy_grad[g, b, k] * dE[g, b, k]/dtheta`` into the parameters' ``.grad``, g over
    the n branches of ``branches`` (a contiguous range; default all G), ``energy_grad [n, NB, K]``.

    The memory-lean second pass of a replay: with ``energy_grad [n, NB, K]`` = dLoss/dE from a no-grad
    :func:`replay_energies` pass, it recomputes one (block, step) prediction at a time with a graph and back-propagates
    it at once, so only one forward's activations are alive (instead of NB x grad_steps of them). Costs one more
    forward per gradient step. Same gradient as back-propagating through a graph-recording replay (the context
    commits carry no gradient in either).
    """
    rows, num_blocks = branch_rows(rollout, branches), _check_blocks(rollout, energy_grad.shape[1])
    if energy_grad.shape[0] != rows.stop - rows.start:
        raise ValueError(f"energy_grad: needs one row per replayed branch ({rows.stop - rows.start}), got "
                         f"{tuple(energy_grad.shape)}")
    sigmas, weights, caches, embeds, _ = _replay_setup(gen, rollout, num_blocks, step_weights, energy_scale,
                                                       energy_space, rows)
    for i, cache in enumerate(caches):
        block = rollout.fork_block + i
        for k in range(grad_steps):
            with torch.enable_grad():
                pred = gen.predict_x0(cache, block, rollout.x_t[i, k, rows], sigmas[k], embeds)
                energy = velocity_energy(pred.unsqueeze(1), rollout.x0_pred[i, k, rows].unsqueeze(1),
                                         weights[k:k + 1], reduction="mean", backend=backend)   # [n, 1]
                torch.autograd.backward(energy[:, 0], energy_grad[:, i, k].to(energy))


def group_rewards(reward_fn, rollout: GroupRollout, *, clip_len: int = 36,
                  stride: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(local, global)``, each ``[G + 1, C_r]`` float64 on the CPU: the released reward windows (module docstring).

    local: ``reward_fn`` on the perturbed chunk with the fork's segment id; global: the mean over segments of
    ``reward_fn`` on each segment's clip with its segment id.
    """
    video, batch = rollout.video(), rollout.chunk.shape[0]
    start, end = rollout.perturbed_chunk

    def score(latents, segment):
        ids = torch.full((batch,), rollout.segment_ids[segment], dtype=torch.long)
        return reward_fn(latents, ids).double().cpu()

    with torch.no_grad():
        local = score(video[:, :, start:end], rollout.segment_at(rollout.prefix.shape[2]))  # the fork's segment
        clips = global_reward_clips(video.shape[2], rollout.switch_frames, clip_len, stride)
        global_ = torch.stack([score(video[:, :, a:b], segment) for segment, a, b in clips]).mean(0)
    return local, global_
