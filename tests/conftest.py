"""Root test configuration. Triton reads TRITON_INTERPRET when kernels are *decorated*, so it is set here, before any
test module imports ``kernels``: on a machine without CUDA every Triton kernel runs in the CPU interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels._backend import HAS_TRITON  # noqa: E402

# The backends every kernel test runs through: the PyTorch reference always, Triton when importable.
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force ``RLHF_KERNELS_BACKEND`` for one test; yields the backend name."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    """The device tests allocate on: CUDA when present (the GPU box), else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
