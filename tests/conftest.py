"""Root test configuration. Triton reads TRITON_INTERPRET when kernels are *decorated*, so it is set here, before any
test module imports ``kernels``: on a machine without CUDA every Triton kernel runs in the CPU interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import _extension  # noqa: E402
from kernels._backend import HAS_TRITON  # noqa: E402

# The backends every kernel test runs through: the PyTorch reference always, Triton when importable, and the
# compiled extension ("cpp") for the test modules that list their ops in ``CPP_OPS`` (skipped when
# RLHF_ENGINE_BUILD_EXT=0; a failed build fails here and in tests/kernels/test_extension.py, never silently skips).
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        cpp = ["cpp"] if getattr(metafunc.module, "CPP_OPS", ()) else []
        metafunc.parametrize("backend", BACKENDS + cpp, indirect=True)


@pytest.fixture
def backend(request, monkeypatch):
    """Force ``RLHF_KERNELS_BACKEND`` for one test; yields the backend name."""
    if request.param == "cpp":
        if not _extension.enabled():
            pytest.skip("compiled extension disabled (RLHF_ENGINE_BUILD_EXT=0)")
        if torch.cuda.is_available():
            pytest.skip("the compiled kernels are CPU kernels")
        missing = [op for op in request.module.CPP_OPS if not _extension.has_op(op)]
        if missing:
            pytest.fail(f"compiled extension lacks {missing}: {_extension.extension_error()}")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    """The device tests allocate on: CUDA when present (the GPU box), else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
