"""Shared setup of the trainer tests."""
import pytest
import torch

# Under pytest without CUDA, conftest turns on TRITON_INTERPRET, which would send the attention and energy of every
# forward through the Triton interpreter: the trainer tests pin the pure-PyTorch backends (the kernels have their own
# tests) and one intra-op thread (these tensors are tiny; threads only add contention on a loaded 2-core machine).
FAST = ["model.backend=torch", "replay.energy_backend=torch", "run.progress=false", "run.plot=false"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
