"""Backend selection for every op: Triton, the compiled extension, or the PyTorch reference.

Rules (DESIGN.md, "kernels/: one op, one file"):
- CUDA tensors -> Triton;
- CPU tensors -> the compiled extension where it has the op (``kernels._extension``, built on first use), else the
  PyTorch reference;
- ``RLHF_KERNELS_BACKEND=triton|cpp|torch`` forces one. Tests force ``triton`` on the CPU together with
  ``TRITON_INTERPRET=1`` (which must be set before this package is imported: ``triton.jit`` reads it at decoration).

float64 inputs always take the reference: it is the executable spec, and the kernels compute in float32.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from kernels import _extension

try:  # triton is optional: the CPU torch wheel does not pull it, and macOS has none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    def _missing_jit(fn=None, **_kwargs):
        if fn is None:
            return _missing_jit
        return fn

    triton = SimpleNamespace(jit=_missing_jit, cdiv=lambda a, b: (a + b - 1) // b, next_power_of_2=None)
    tl = SimpleNamespace(constexpr=int)

BACKENDS = ("triton", "cpp", "torch")
ENV_VAR = "RLHF_KERNELS_BACKEND"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    """The backend named by ``RLHF_KERNELS_BACKEND`` (read on every call, so tests can flip it), or None."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def select_backend(op: str, *tensors: torch.Tensor | None) -> str:
    """Which implementation of ``op`` runs on ``tensors`` (the first one decides the device): ``"triton"``,
    ``"cpp"`` (the compiled extension, ``kernels._extension``) or ``"torch"`` (the reference).

    Default: float64 -> torch; CUDA -> triton; CPU -> cpp where the extension has the op (building it on first use),
    else torch. ``RLHF_KERNELS_BACKEND`` overrides.

    Raises:
        RuntimeError: the backend is forced to ``triton`` but triton is not importable, or the inputs live on the CPU
            without ``TRITON_INTERPRET=1``; or it is forced to ``cpp`` and the extension lacks ``op`` or the inputs
            are not on the CPU.
    """
    first = next(t for t in tensors if t is not None)
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "torch"
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "cpp":
        if not _extension.has_op(op, first.device.type):
            raise RuntimeError(
                f"{ENV_VAR}=cpp but the compiled extension has no {first.device.type} kernel for op {op!r} "
                f"(enabled: {_extension.enabled()}, "
                f"build errors: {_extension.extension_error() or 'none'}); unset {ENV_VAR} to use the "
                "Triton/PyTorch paths")
        return "cpp"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install triton)")
        if not first.is_cuda and not interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=triton with CPU tensors needs TRITON_INTERPRET=1 set before `import kernels`"
            )
        return "triton"
    if first.is_cuda:
        return "triton" if HAS_TRITON else "torch"
    if first.device.type == "cpu" and _extension.has_op(op):
        return "cpp"
    return "torch"


def use_triton(op: str, *tensors: torch.Tensor | None) -> bool:
    """Whether ``op`` (an op without a compiled CPU kernel) runs its Triton kernel on ``tensors``; raises as
    :func:`select_backend` does, and when ``cpp`` is forced (this op has no compiled kernel)."""
    backend = select_backend(op, *tensors)
    if backend == "cpp":  # only reachable when forced: has_op(op) is False for these ops
        raise RuntimeError(f"op {op!r}: the compiled extension path is not wired for this op")
    return backend == "triton"


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype all log-prob/ratio/loss math runs in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def describe() -> dict[str, object]:
    """A report of the active backends and why, for ``rlhf-engine env`` and the bench JSON."""
    return {
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None) if HAS_TRITON else None,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "compiled_extension": _extension.status(),
        "forced_backend": os.environ.get(ENV_VAR) or None,
        "triton_interpret": interpreting(),
    }
