"""torch.distributed glue: torchrun-compatible init (NCCL on GPUs, gloo on CPU), work split, gradient averaging.

Each rank runs its share of the step's groups (group i goes to rank i % world_size) with seeds derived from the
global group index, so the union over ranks is exactly the single-process step; gradients are summed over ranks and
divided by the number of groups, which makes the update equal to the single-process one on the same data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1 in the environment), else single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    initialized_here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    initialized_here=initialized_here)


def local_groups(num_groups: int, info: DistInfo) -> List[int]:
    """Global indices of the groups this rank rolls out (round robin)."""
    return list(range(info.rank, num_groups, info.world_size))


def all_reduce_sum_(tensors: Iterable[torch.Tensor], info: DistInfo) -> None:
    """Sum each tensor over ranks in place (one flat buffer per dtype/device: few collectives)."""
    if info.world_size <= 1:
        return
    tensors = list(tensors)
    buckets = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def all_reduce_scalars(values: List[float], info: DistInfo, device: torch.device) -> List[float]:
    """Sum a few Python floats over ranks (for metrics and the skip decision, so every rank agrees)."""
    if info.world_size <= 1:
        return list(values)
    buffer = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.tolist()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
