"""Dispatch rules of kernels._backend: the env override, float64 -> reference, and clear errors."""

import pytest
import torch

import kernels as K
from kernels import _backend


def test_unknown_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"RLHF_KERNELS_BACKEND must be one of \('triton', 'cpp', 'torch'\), got 'cuda'"):
        K.kl_penalty(torch.randn(2, 3), torch.randn(2, 3))


def test_torch_backend_and_float64_take_the_reference(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "torch")
    assert not _backend.use_triton("kl_penalty", x)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "triton")
    assert not _backend.use_triton("kl_penalty", x.double())


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CPU-only rule")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        _backend.use_triton("kl_penalty", torch.randn(2))


def test_forced_cpp_without_the_extension_says_so(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="compiled extension has no cpu kernel for op 'kl_penalty'"):
        K.kl_penalty(torch.randn(2, 3), torch.randn(2, 3))


def test_default_dispatch_follows_the_device(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    assert not _backend.use_triton("kl_penalty", torch.randn(2))
    report = K.backend_report()
    assert {"torch", "triton", "device", "compiled_extension"} <= set(report)
