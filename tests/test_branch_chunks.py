"""replay.branch_backward_chunk_size (released LongLive trainer ``_iter_branch_backward_chunks``, kvpo.py l. 2690-2697
and 2963-3096; MemFlow config 4): the group's replay forwards and backward run n branches at a time, the loss once
over the whole group. Pinned on the tiny model in float64: the same gradient of every trainable parameter, the same
loss and metrics, the same weights after a short run, and no forward holds more than n branches."""
import pytest
import torch

from kvpo_kernels.cache import _BlockPool
from kvpo_kernels.trainer.config import RESUMABLE, load_config
from kvpo_kernels.trainer.loop import Trainer
from kvpo_kernels.trainer.model import build_transformer, plan_memory
from kvpo_kernels.trainer.rollout import replay_energies

from _trainer_setup import FAST, one_thread  # noqa: F401  (autouse fixture)

G = 4  # the tiny preset's branches: chunk 3 does not divide it
# the policy window covers 3 blocks (the replay context commits are exercised), gradients through 2 steps; no LR
# warmup, so the first step moves the policy away from the old and reference policies
WINDOW = ["replay.policy_window_frames=3", "replay.grad_steps=2", "optim.warmup_steps=0"]
MEMFLOW = ["streaming.memory_bank_frames=2", "streaming.bank_record_interval=2"]


def _in_float64(transformer):
    """diffusers' Wan upcasts to float32 (``hidden_states.float()``, FP32LayerNorm): meant for bf16, it rounds a
    float64 model's activations to float32. During this transformer's forwards ``.float()`` keeps a float64 tensor,
    so the model computes in float64 throughout and two summation orders agree to ~1e-15 (in float32 the norms'
    gradients, summed over the batch, differ by ~1e-7 relative, and AdamW's g / (|g| + eps) amplifies that up to
    lr / eps = 1e5 times)."""
    to_float32 = torch.Tensor.float

    def keep_float64(tensor, *args, **kwargs):
        return tensor if tensor.dtype == torch.float64 else to_float32(tensor, *args, **kwargs)

    def enter(module, args):
        torch.Tensor.float = keep_float64

    def leave(module, args, output):
        del torch.Tensor.float  # the class's own method again

    assert "float" not in vars(torch.Tensor)  # the patch shadows the inherited method, the deletion restores it
    transformer.register_forward_pre_hook(enter)
    transformer.register_forward_hook(leave, always_call=True)
    return transformer


def _trainer(tmp_path, chunk, *overrides):
    config = load_config("tiny", overrides=FAST + WINDOW + [f"run.output_dir={tmp_path}",
                                                             f"replay.branch_backward_chunk_size={chunk}",
                                                             *overrides])
    torch.manual_seed(0)  # the random tiny model's weights
    return Trainer(config, transformer=_in_float64(build_transformer(config).double()))


def _second_step_trainer(tmp_path, *overrides):
    """A trainer after one step: at the second rollout the old and the reference policy differ from the policy."""
    trainer = _trainer(tmp_path, 0, *overrides)
    assert trainer.master is None  # float64 trains in float64 (no float32 masters)
    trainer.train_step()
    return trainer


def _group_backward(trainer, chunk):
    """One group (rollout, its old / reference replays) and its loss and backward (Trainer._group_loss) with the
    chunk size set on the trainer (read at each use): gradients by name and the group's metrics."""
    trainer.config.replay.branch_backward_chunk_size = chunk
    group = trainer._roll_out_group(0, old_is_policy=False)
    trainer.transformer.zero_grad(set_to_none=True)
    metrics = trainer._group_loss(group)
    return {name: param.grad.clone() for name, param in trainer.transformer.named_parameters()
            if param.grad is not None}, metrics


@pytest.mark.parametrize("overrides", [(), ("replay.rematerialize=true",), MEMFLOW], ids=["graph", "remat", "memflow"])
def test_branch_chunked_backward_equals_the_unchunked_one(tmp_path, overrides):
    trainer = _second_step_trainer(tmp_path, *overrides)
    full_grads, full_metrics = _group_backward(trainer, 0)
    assert len(full_grads) == len(trainer.trainable) and sum(float(g.abs().sum()) for g in full_grads.values()) > 0
    assert full_metrics["kl"] > 0 and full_metrics["ratio_min"] != full_metrics["ratio_max"]  # all terms act
    for chunk in (1, 3, G, G + 1) if not overrides else (1, 3):
        grads, metrics = _group_backward(trainer, chunk)
        assert grads.keys() == full_grads.keys()
        for name, grad in grads.items():
            if chunk >= G:  # released: a chunk of all G branches is the unchunked path (bitwise)
                assert torch.equal(grad, full_grads[name]), (chunk, name)
            torch.testing.assert_close(grad, full_grads[name], rtol=1e-12, atol=1e-14,
                                       msg=lambda text: f"chunk {chunk}: {name}: {text}")
        assert metrics.keys() == full_metrics.keys()
        for key, value in metrics.items():
            assert value == pytest.approx(full_metrics[key], rel=1e-12, abs=1e-15), (chunk, key)


def test_a_short_run_trains_the_same_weights(tmp_path):
    runs = {}
    for chunk in (0, 3):
        trainer = _trainer(tmp_path / str(chunk), chunk)
        records = trainer.train(steps=3)
        assert not any(record["skipped"] for record in records)
        runs[chunk] = trainer, records
    (full, full_records), (chunked, chunked_records) = runs[0], runs[3]
    for param, other in zip(full.trainable, chunked.trainable):
        torch.testing.assert_close(other, param, rtol=0, atol=1e-10)
    assert any(not torch.equal(param, start) for param, start in zip(full.trainable, full.ref))  # it trained
    for record, other in zip(full_records, chunked_records):
        for key in ("loss", "kl", "reward_mean", "grad_norm", "ratio_mean", "energy_mean"):
            assert other[key] == pytest.approx(record[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("remat", [False, True])
def test_no_forward_holds_more_than_a_chunk_of_branches(tmp_path, remat, monkeypatch):
    """Every transformer forward of the update (the replays of the policy, with and without graph) and of the old /
    reference replays batches at most n branches; unchunked, the replay batches all G. Each chunk's replay reuses
    the blocks the previous one freed: the KV pool never grows after the rollout sized it."""
    trainer = _second_step_trainer(tmp_path, f"replay.rematerialize={str(remat).lower()}")
    batches, grows, real_grow = [], [], _BlockPool.grow
    trainer.transformer.register_forward_pre_hook(
        lambda module, args: batches.append((args[0].shape[0], torch.is_grad_enabled())))
    monkeypatch.setattr(_BlockPool, "grow", lambda pool, extra: (grows.append(extra), real_grow(pool, extra))[1])
    for chunk in (0, 3, 1):
        batches.clear()
        grows.clear()
        _group_backward(trainer, chunk)
        assert len(grows) == 1, f"chunk {chunk}: the pool grew after the rollout made it: {grows}"
        # the rollout's forwards batch 1 (prefix) or G + 1 (the chunk); the replays come after its last one
        last_rollout = max(index for index, (batch, _) in enumerate(batches) if batch == G + 1)
        replays = batches[last_rollout + 1:]
        assert any(grad for _, grad in replays) and any(not grad for _, grad in replays)
        if chunk == 0:
            assert max(batch for batch, _ in replays) == G
        else:
            assert max(batch for batch, _ in replays) == chunk
            assert {batch for batch, grad in replays if grad} == {chunk, G % chunk} - {0}


def test_subset_replay_equals_the_group_replay(tmp_path):
    """replay_energies of a branch range gives those rows of the whole group's energies (each branch reads only
    its own history); a range outside the group is refused."""
    trainer = _trainer(tmp_path, 0, *MEMFLOW)
    group = trainer._roll_out_group(0, old_is_policy=True)
    kwargs = dict(grad_steps=2, backend="torch")
    with torch.no_grad():
        whole = replay_energies(trainer.generator, group.rollout, **kwargs)
        part = replay_energies(trainer.generator, group.rollout, branches=range(1, 3), **kwargs)
    torch.testing.assert_close(part, whole[1:3], rtol=1e-12, atol=1e-15)
    for bad in (range(0), range(2, G + 1), range(0, G, 2), [0, 1]):
        with pytest.raises(ValueError, match="branches"):
            replay_energies(trainer.generator, group.rollout, branches=bad, **kwargs)


def test_config_key_is_checked_resumable_and_set_by_the_memflow_preset():
    assert load_config("tiny").replay.branch_backward_chunk_size == 0
    assert load_config("wan1.3b").replay.branch_backward_chunk_size == 0      # train_kvpo_longlive.yaml l. 48
    assert load_config("memflow1.3b").replay.branch_backward_chunk_size == 4  # train_kvpo_memflow.yaml l. 48
    assert "replay.branch_backward_chunk_size" in RESUMABLE  # it changes no value, only the memory peak
    with pytest.raises(ValueError, match="replay.branch_backward_chunk_size"):
        load_config("tiny", overrides=["replay.branch_backward_chunk_size=-1"])
    with pytest.raises(TypeError, match="replay.branch_backward_chunk_size"):
        load_config("tiny", overrides=["replay.branch_backward_chunk_size=2.5"])


def test_memory_plan_counts_the_branches_of_one_graph():
    memflow = load_config("memflow1.3b")
    unchunked = load_config("memflow1.3b", overrides=["replay.branch_backward_chunk_size=0"])
    assert plan_memory(unchunked).activation_bytes == 2 * plan_memory(memflow).activation_bytes  # 8 -> 4 branches
    assert plan_memory(memflow).kv_pool_bytes == plan_memory(unchunked).kv_pool_bytes
