"""Two CPU processes on gloo (set up exactly as torchrun does, through environment variables) take the same update
as one process on the same data: rollouts split across ranks, gradients averaged."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from _trainer_setup import FAST as _FAST

FAST = _FAST + ["rollout.num_branches=3", "rollout.groups_per_step=4", "optim.updates_per_rollout=1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_step(out_dir):
    from kvpo_kernels.trainer.config import load_config
    from kvpo_kernels.trainer.distributed import cleanup, init_distributed
    from kvpo_kernels.trainer.loop import Trainer

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        trainer = Trainer(load_config("tiny", overrides=FAST + [f"run.output_dir={out_dir}"]), dist=dist)
        record = trainer.train_step()
        return dist, {"record": record, "grads": [p.grad.clone() for p in trainer.trainable],
                      "weights": [p.detach().clone() for p in trainer.trainable]}
    finally:
        cleanup(dist)


def _worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    dist, result = _one_step(out_dir)
    assert dist.world_size == world_size and dist.rank == rank
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    threads = torch.get_num_threads()
    try:
        dist, single = _one_step(str(tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    assert dist.world_size == 1

    for rank in ranks:
        # Every rank ends with the all-reduced gradient and the same weights.
        for got, want in zip(rank["grads"], single["grads"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        for got, want in zip(rank["weights"], single["weights"]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        for key in ("loss", "reward_mean", "kl", "grad_norm"):
            assert rank["record"][key] == pytest.approx(single["record"][key], rel=1e-5, abs=1e-9), key
    assert any(g.abs().sum() > 0 for g in single["grads"])
    # Each rank rolled out half of the groups, so the agreement above needed the gradient all-reduce.
    assert [rank["record"]["local_groups"] for rank in ranks] == [2, 2] and single["record"]["local_groups"] == 4
