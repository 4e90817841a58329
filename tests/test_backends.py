"""available_backends() and the dispatcher, as velocity_energy uses them: reasons up front, errors that say why."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kvpo_kernels
from kvpo_kernels._backends import BACKENDS, machine_unavailable, native_extension
from kvpo_kernels.ops.velocity_energy import _choose_backend

CPU = torch.device("cpu")


def test_available_backends_lists_every_backend_with_a_reason():
    table = kvpo_kernels.available_backends()
    assert "velocity_energy" in table
    entry = table["velocity_energy"]
    assert tuple(entry) == BACKENDS
    assert entry["torch"] is None
    for backend, why in entry.items():
        assert why is None or (isinstance(why, str) and why), backend
    assert kvpo_kernels.available_backends("velocity_energy") == {"velocity_energy": entry}
    assert "velocity_energy" in kvpo_kernels.describe_backends()


def test_available_backends_unknown_op():
    with pytest.raises(ValueError, match="op must be one of"):
        kvpo_kernels.available_backends("no_such_op")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without a GPU")
def test_reasons_without_gpu():
    entry = kvpo_kernels.available_backends("velocity_energy")["velocity_energy"]
    assert "CUDA" in entry["cuda"] or "not built" in entry["cuda"]
    module, _ = native_extension()
    if module is not None:
        assert entry["cpu"] is None


@pytest.mark.skipif(machine_unavailable("cpu") is not None, reason="C++ extension not built")
def test_auto_on_cpu_tensors_picks_the_cpp_backend_not_the_interpreter(monkeypatch):
    monkeypatch.delenv("KVPO_BACKEND", raising=False)
    assert _choose_backend("auto", CPU, torch.float32) == "cpu"
    assert _choose_backend("auto", CPU, torch.bfloat16) == "cpu"


def test_env_override(monkeypatch):
    monkeypatch.setenv("KVPO_BACKEND", "torch")
    assert _choose_backend("auto", CPU, torch.float32) == "torch"
    # an explicit argument wins over the environment
    if machine_unavailable("cpu") is None:
        assert _choose_backend("cpu", CPU, torch.float32) == "cpu"
    monkeypatch.setenv("KVPO_BACKEND", "fastest")
    with pytest.raises(ValueError, match="KVPO_BACKEND"):
        _choose_backend("auto", CPU, torch.float32)


def test_env_override_to_an_unusable_backend_says_why(monkeypatch):
    if machine_unavailable("cuda") is None:
        pytest.skip("cuda is usable here")
    monkeypatch.setenv("KVPO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot serve"):
        kvpo_kernels.velocity_energy(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_explicit_backend_that_cannot_serve_says_why():
    pred = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="backend='cuda' cannot serve these inputs: .*"):
        kvpo_kernels.velocity_energy(pred, pred.clone(), backend="cuda")


def test_unsupported_dtype_for_a_backend_says_why():
    if machine_unavailable("cuda") is not None:
        pytest.skip(machine_unavailable("cuda"))
    pred = torch.randn(2, 3, 4, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="float64"):
        kvpo_kernels.velocity_energy(pred, pred.clone(), backend="cuda")


def test_explicit_triton_on_cpu_tensors_runs_only_under_the_interpreter(monkeypatch):
    if machine_unavailable("triton") is not None and "not installed" in machine_unavailable("triton"):
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _choose_backend("triton", CPU, torch.float32)


def test_bad_backend_names():
    pred = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        kvpo_kernels.velocity_energy(pred, pred, backend="fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        kvpo_kernels.velocity_energy(pred, pred, backend=1)


def test_import_does_not_pull_dynamo_or_triton():
    """``import kvpo_kernels`` must cost about ``import torch`` (issue 13: torch._dynamo was ~2 s of ~5 s);
    benchmarks/measure_import_time.py measures the ratio."""
    code = "import sys, kvpo_kernels; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.stdout.strip() == "[]", done.stdout


def test_constant_result_marker_is_what_torch_sets():
    """_device.assume_constant_result sets dynamo's marker without importing dynamo; torch's own decorator must
    still work by that one attribute, else the backend choice would be traced instead of folded."""
    from kvpo_kernels._device import assume_constant_result

    def ours():
        pass

    def theirs():
        pass

    torch.compiler.assume_constant_result(theirs)
    assert vars(assume_constant_result(ours)) == vars(theirs) == {"_dynamo_marked_constant": True}


def test_disable_extension_hides_the_cpp_backends(monkeypatch):
    monkeypatch.setenv("KVPO_DISABLE_EXTENSION", "1")
    native_extension.cache_clear()
    try:
        table = kvpo_kernels.available_backends("velocity_energy")["velocity_energy"]
        assert "KVPO_DISABLE_EXTENSION=1" in table["cpu"] and "KVPO_DISABLE_EXTENSION=1" in table["cuda"]
        assert _choose_backend("auto", CPU, torch.float32) == "torch"
    finally:
        monkeypatch.delenv("KVPO_DISABLE_EXTENSION")
        native_extension.cache_clear()


def test_suite_subset_without_the_extension():
    """The pure-Python install path (no kvpo_kernels._C) stays tested: the backend tests and the velocity_energy
    cases that once failed without it (B * T = 0), in a fresh process with KVPO_DISABLE_EXTENSION=1."""
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(tests, "test_backends.py"),
         os.path.join(tests, "test_velocity_energy.py"), "-k",
         "not without_the_extension and (empty_batch or no_rows or bad_inputs or weights_and_reductions or auto)"],
        capture_output=True, text=True, env={**os.environ, "KVPO_DISABLE_EXTENSION": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
