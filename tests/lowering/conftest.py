"""Fixtures the kernel tests share (tests/conftest.py sets the device and the interpreter)."""
import pytest
import torch


@pytest.fixture(params=["reference", "kernel"])
def path(request, monkeypatch):
    """Each test twice: CPU tensors through the reference, and through the Triton kernels (interpreter)."""
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton" if request.param == "kernel" else "reference")
    return request.param


@pytest.fixture
def poison_uninitialized():
    """torch.empty returns NaN-filled memory while this is on: unwritten outputs cannot pass."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
