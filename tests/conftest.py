import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run, but a failing seed is printed so it can be replayed (KVPO_TEST_SEED)."""
    seed = int(os.environ.get("KVPO_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"\nreplay with KVPO_TEST_SEED={seed}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
