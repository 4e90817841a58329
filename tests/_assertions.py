"""Shared comparison helpers: the flash-attention rule, with a report that says where and how a tensor is wrong."""
from __future__ import annotations

import math

import torch


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual64 - expected64).abs()
    nan_mismatch = int((torch.isnan(actual64) != torch.isnan(expected64)).sum())
    inf_mismatch = int((torch.isinf(actual64) != torch.isinf(expected64)).sum())
    err = torch.where(torch.isfinite(err), err, torch.zeros_like(err))
    worst = int(err.argmax()) if err.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) if err.numel() else ()
    bad = int((err > tol).sum())
    return (f"{bad}/{err.numel()} elements off by more than {tol:.3g}; worst {float(err.max()) if err.numel() else 0:.3g} "
            f"at {index} (got {float(actual64.flatten()[worst]) if err.numel() else 0:.6g}, "
            f"want {float(expected64.flatten()[worst]) if err.numel() else 0:.6g}); "
            f"NaN mismatches {nan_mismatch}, inf mismatches {inf_mismatch}")


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| with inf == inf (same sign) counting as 0 and any NaN counting as inf."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    both_inf_equal = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = torch.where(both_inf_equal, torch.zeros_like(a), (a - e).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max())


def rounding_allowance(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """One rounding step of ``dtype`` at the truth's largest magnitude plus 0.3: flash-attention 3's gradient
    allowance ``2 * max|ref + 0.3 - 0.3 - ref|`` (ref in the low dtype) taken at its worst case.

    FA3's expression samples the rounding error of each element; on its large test tensors the maximum reaches half
    a step of the top binade, so the allowance is one step there. On the few elements the CPU tests afford it can
    come out at half that (seed 1069788279 of the fp16 decode case: 0.00098 for values up to 2.35, whose step is
    0.00195), and a kernel 2.5 steps off on one element of 1440, from rounding dS and the output to fp16 as every
    flash-attention backward does, failed by luck. The step itself is what the expression estimates.
    """
    finite = truth.detach().double().nan_to_num(posinf=0.0, neginf=0.0)
    if finite.numel() == 0:
        return 0.0
    magnitude = float(finite.abs().max()) + 0.3
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def assert_close_to_truth(name: str, actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor | None = None,
                          *, rtol: float = 1e-4, factor: float = 2.0, atol: float = 1e-5) -> None:
    """flash-attention's rule: err(actual) <= factor * err(baseline) + atol, both against the float64 truth.

    ``baseline`` is the same computation done with PyTorch ops in the kernel's dtype. For a low-precision baseline
    the atol also holds flash-attention 3's rounding allowance (one step of that dtype at the truth's magnitude):
    on the small shapes the CPU tests afford, PyTorch's own result is often within one rounding step of the truth,
    so 2x its error alone would demand better than the dtype can represent. Without a baseline (fp32 kernels), the
    error must be within ``rtol`` of the truth's magnitude (plus ``atol``).
    """
    err = max_abs_error(actual, truth)
    if baseline is not None:
        if baseline.dtype in (torch.float16, torch.bfloat16):
            atol = atol + rounding_allowance(truth, baseline.dtype)
        tol = factor * max_abs_error(baseline, truth) + atol
    else:
        tol = rtol * max(1.0, float(truth.detach().double().abs().nan_to_num(posinf=0, neginf=0).max())) + atol
    if not err <= tol:
        raise AssertionError(f"{name}: error {err:.3g} > tolerance {tol:.3g}: {describe_mismatch(actual, truth, tol)}")
