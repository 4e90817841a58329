"""The tensor-descriptor (TMA) forward against the float64 reference, on the cases of the pointer forward.

On CPU it runs under TRITON_INTERPRET=1 (conftest.py), which interprets ``tl.make_tensor_descriptor`` with its zero
fill, in fp32 and fp16 (the interpreter's bf16 dot is wrong: the backend table refuses bf16 there). Its sm_90
build (UTMALDG, HGMMA, warp specialisation) is checked by test_sm90_gate.py.
"""
from __future__ import annotations

import random

import pytest
import torch

import kvpo_kernels.triton.routed_attention_tma as tma_module
from kvpo_kernels import reference, routed_attention
from kvpo_kernels.triton.routed_attention_tma import routed_attention_forward_tma

from _assertions import assert_close_to_truth
from test_routed_attention import (BACKENDS, CASES, DEVICE, SHARED, Case, check_against_reference,  # noqa: F401
                                   make_inputs, poison_outputs)
from test_fuzz import _check_routed_attention, _routed_attention_case

TMA_CASES = CASES + [SHARED]


def forward(inputs, softmax_scale=None):
    """The launcher with the defaults the public op fills in (counts = M, scale = 1 / sqrt(D))."""
    table = inputs["block_table"]
    counts = inputs["block_counts"]
    if counts is None:
        counts = torch.full((table.shape[0],), table.shape[1], dtype=torch.int32, device=table.device)
    scale = inputs["q"].shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return routed_attention_forward_tma(inputs["q"], inputs["k_cache"], inputs["v_cache"], table, counts,
                                        inputs["k_new"], inputs["v_new"], scale)


def reference_forward(inputs, dtype=None):
    cast = {name: value.to(dtype) if dtype is not None and value is not None and value.is_floating_point() else value
            for name, value in inputs.items()}
    return reference.routed_attention(**cast, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TMA_CASES, ids=[case.name for case in TMA_CASES])
def test_tma_forward_matches_reference(case, dtype, poison_outputs):
    inputs = make_inputs(case, dtype)
    out, lse = forward(inputs)
    truth_out, truth_lse = reference_forward(inputs, torch.float64)
    base_out, base_lse = reference_forward(inputs) if dtype != torch.float32 else (None, None)
    assert out.dtype == dtype and out.shape == truth_out.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == truth_lse.shape
    assert_close_to_truth("out", out, truth_out, base_out)
    assert_close_to_truth("lse", lse, truth_lse, base_lse)


@pytest.mark.parametrize("new_len", [0, 5], ids=["no-new", "new"])
def test_tma_empty_rows(new_len, poison_outputs):
    """Row 0 reads no block: out 0 and lse -inf without a chunk; exactly its chunk's attention with one."""
    case = Case("S3-empty", 3, 2, 4, 2, 1, 16, [[0, 1], [1, 1]], [0, 2], new_len=new_len)
    inputs = make_inputs(case, torch.float32)
    out, lse = forward(inputs)
    truth_out, truth_lse = reference_forward(inputs, torch.float64)
    if new_len == 0:
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()
    assert_close_to_truth("out", out, truth_out)
    assert_close_to_truth("lse", lse, truth_lse)


# The zero-filled query rows past Lq give 0 * -inf = NaN scores in rows that are never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("table", [[[0, 1]], [[1, 0]]], ids=["masked-first", "masked-last"])
def test_tma_tile_of_minus_inf_keys_adds_nothing(table):
    """A key tile whose scores are all -inf (here the first block's) must not turn the row into NaN."""
    q = torch.ones(1, 1, 1, 16, device=DEVICE)
    k_cache = torch.zeros(2, 1, 1, 16, device=DEVICE)
    k_cache[0] = float("-inf")
    v_cache = torch.tensor([5.0, 7.0], device=DEVICE).view(2, 1, 1, 1).expand(2, 1, 1, 16).contiguous()
    out, lse = routed_attention_forward_tma(q, k_cache, v_cache, torch.tensor(table, dtype=torch.int32, device=DEVICE),
                                            torch.tensor([2], dtype=torch.int32, device=DEVICE), None, None, 0.25)
    assert torch.equal(out, torch.full_like(out, 7.0))
    assert torch.equal(lse, torch.zeros_like(lse))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in that row, by design
def test_tma_lse_is_plus_inf_for_a_plus_inf_score():
    """As the pointer forward: logsumexp over a +inf score is +inf (so the backward's P is 0 elsewhere)."""
    q = torch.ones(1, 1, 1, 16, device=DEVICE)
    k_cache = torch.zeros(2, 3, 1, 16, device=DEVICE)
    k_cache[1, 2] = float("inf")
    _, lse = routed_attention_forward_tma(q, k_cache, torch.randn_like(k_cache), torch.tensor([[0, 1]], device=DEVICE),
                                          torch.tensor([2], device=DEVICE), None, None, 0.25)
    assert torch.equal(lse, torch.full_like(lse, float("inf")))


def test_tma_refuses_what_descriptors_cannot_describe():
    case = Case("S4-D8", 4, 2, 3, 2, 1, 8, [[0, 1]], None)
    inputs = make_inputs(case, torch.float32)
    forward(inputs)  # D = 8 fp32: 32-byte rows, fine
    with pytest.raises(ValueError, match="k_cache needs a 16-byte aligned base"):  # D = 6 fp32: 24-byte rows
        forward(dict(inputs, **{name: inputs[name][..., :6].contiguous() for name in ("k_cache", "v_cache")}))
    with pytest.raises(ValueError, match="q must have unit stride on D"):
        forward(dict(inputs, q=inputs["q"].transpose(-1, -3).contiguous().transpose(-1, -3)))
    with pytest.raises(ValueError, match="block_table width M"):
        forward(dict(inputs, block_table=torch.zeros(1, 1025, dtype=torch.int32, device=DEVICE),
                     block_counts=torch.tensor([2], dtype=torch.int32, device=DEVICE)))


@pytest.fixture
def tma_forward(monkeypatch):
    """Select the TMA forward for the public op (KVPO_TRITON_FORWARD=tma); record its launcher's completed calls."""
    if "triton" not in BACKENDS:
        pytest.skip("the triton backend does not run here")
    calls = []

    def counted(*args):
        result = routed_attention_forward_tma(*args)
        calls.append(args)
        return result

    monkeypatch.setenv("KVPO_TRITON_FORWARD", "tma")
    monkeypatch.setattr(tma_module, "routed_attention_forward_tma", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_public_op_on_the_tma_forward_matches_reference_with_gradients(dtype, tma_forward, poison_outputs):
    """Through ``routed_attention(backend="triton")``: the TMA forward's out and lse feed the backward kernels."""
    check_against_reference(SHARED, dtype, "triton")
    assert len(tma_forward) == 1


def test_public_op_on_the_tma_forward_refuses_bf16_under_the_interpreter(tma_forward):
    if DEVICE != "cpu":
        pytest.skip("only the interpreter's bf16 dot is wrong")
    inputs = make_inputs(SHARED, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        routed_attention(**inputs, backend="triton")
    assert not tma_forward


def test_fuzz_public_op_on_the_tma_forward(tma_forward):
    """test_fuzz.py's routed_attention cases (random shapes, strides, tables, NaN/inf) on the TMA forward: no
    non-finite value where the float64 reference is finite, only ValueError/TypeError (a layout the descriptors
    cannot describe is one: about 1 case in 6 meets the descriptors' alignment, hence 40 cases)."""
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    ran = sum(_check_routed_attention(*_routed_attention_case(rng), "triton") for _ in range(40))
    assert tma_forward or not ran
