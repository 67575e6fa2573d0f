"""The compiled extension: C++ sources in ``csrc/cpu/`` (and CUDA in ``csrc/cuda/``), compiled on first use.

Why on first use, not at ``pip install``: building at install time needs torch's headers inside pip's isolated build
environment, and there pip would install a torch of its own choosing (a multi-GB CUDA build) whatever torch the
user has. ``torch.utils.cpp_extension.load`` instead compiles against the torch already imported, once, into a cache
keyed by the sources, the flags, the torch version and the CPU; later processes load the cached library in
milliseconds. ``python -m kernels`` builds (or checks) it ahead of time.

Each ``csrc/cpu/<name>.cpp`` is its own shared library ``rlhf_engine_<name>``, so that one source that fails to
compile disables only its own ops. Every op is registered with ``torch.library`` under the ``rlhf_engine`` namespace
(``torch.ops.rlhf_engine.<op>``): dispatchable, visible to ``torch.compile``, and usable inside CUDA graphs.

Environment:
    ``RLHF_ENGINE_BUILD_EXT=0``: never build or load it (every op uses its Triton kernel or PyTorch reference).
    ``RLHF_ENGINE_EXT_DIR``: the build cache (default ``~/.cache/rlhf_engine/extensions``).

A missing compiler or a failed build is never an error: one warning line, ``has_extension()`` is False, and the ops
fall back. The build log is kept in ``extension_error()``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

log = logging.getLogger("rlhf_engine.extension")

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NAMESPACE = "rlhf_engine"
ENV_BUILD = "RLHF_ENGINE_BUILD_EXT"
ENV_DIR = "RLHF_ENGINE_EXT_DIR"
# -march=native: the library is compiled on, and cached for, the machine that runs it (the cache key holds the CPU)
CPU_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]

_lock = threading.Lock()
_loaded: dict[str, bool] = {}  # library name -> loaded
_errors: dict[str, str] = {}
_done = False  # every source tried: load_all is then one flag read
_ops: dict[str, bool] = {}  # has_op answers (the op set is fixed once the libraries are loaded)


def enabled() -> bool:
    """False when ``RLHF_ENGINE_BUILD_EXT=0`` (read on every call)."""
    return os.environ.get(ENV_BUILD, "1").strip() not in ("0", "false", "no", "off")


def cpu_sources() -> list[Path]:
    """The C++ sources of the CPU libraries, one library each."""
    return sorted((CSRC / "cpu").glob("*.cpp"))


def cuda_sources() -> list[list[Path]]:
    """The CUDA libraries, each ``[csrc/cuda/<name>.cpp (torch binding), csrc/cuda/<name>_kernels.cu]``; built only
    on a CUDA build of torch with a visible GPU and nvcc (they register CUDA kernels of ops the CPU libraries
    declare, so they load after them)."""
    if not (torch.version.cuda and torch.cuda.is_available()):
        return []
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return []
    return [[cpp, cpp.with_name(f"{cpp.stem}_kernels.cu")] for cpp in sorted((CSRC / "cuda").glob("*.cpp"))]


def _libraries() -> list[tuple[str, list[Path]]]:
    """``(library name, sources)`` of every library to build on this machine, CPU ones first."""
    libs = [(f"{NAMESPACE}_{s.stem}", [s]) for s in cpu_sources()]
    return libs + [(f"{NAMESPACE}_cuda_{srcs[0].stem}", srcs) for srcs in cuda_sources()]


def _cpu_key() -> str:
    """A short hash of what the compiled code depends on besides its sources: machine, CPU features, torch."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    text = "|".join([platform.machine(), flags, torch.__version__, sys.version.split()[0]])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_root() -> Path:
    """Where the libraries are built and cached."""
    root = os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "rlhf_engine", "extensions")
    return Path(root) / f"torch{torch.__version__.split('+')[0]}-{_cpu_key()}"


def _build_one(name: str, sources: list[Path]) -> None:
    from torch.utils.cpp_extension import load  # imported lazily: it pulls setuptools

    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=[str(s) for s in sources], extra_cflags=CPU_FLAGS, extra_ldflags=["-fopenmp"],
         extra_cuda_cflags=["-O3", "-std=c++17"], extra_include_paths=[str(CSRC / "cpu"), str(CSRC / "cuda")],
         build_directory=str(build_dir), is_python_module=False, verbose=False)


def load_all() -> bool:
    """Build (first time) and load every CPU library; True when all loaded. Thread-safe, idempotent; a failure is
    remembered for the process (one warning, no retry)."""
    global _done
    if not enabled():
        return False
    if _done:
        return bool(_loaded) and all(_loaded.values())
    with _lock:
        todo = [(name, srcs) for name, srcs in _libraries() if name not in _loaded]
        if todo and not any(any((build_root() / name).glob("*.so")) for name, _ in todo):
            log.warning("building the C++ extension (once; cached under %s)", build_root())
        for name, sources in todo:
            try:
                _build_one(name, sources)
                _loaded[name] = True
            except Exception as err:  # noqa: BLE001 - any build failure means: fall back, say why once
                _loaded[name] = False
                _errors[name] = f"{type(err).__name__}: {err}"
                warnings.warn(f"rlhf-engine: the C++ extension {name} did not build ({type(err).__name__}); its ops "
                              f"use the PyTorch/Triton fallback. kernels._extension.extension_error() has the log; "
                              f"{ENV_BUILD}=0 silences this", RuntimeWarning, stacklevel=3)
        _done = True
        if any(_loaded.values()):
            from kernels import _fake_ops  # shape functions: torch.compile traces through the compiled ops

            _fake_ops.register(NAMESPACE, {n for n in _fake_ops.FAKES if hasattr(getattr(torch.ops, NAMESPACE), n)})
        return bool(_loaded) and all(_loaded.values())


def has_extension() -> bool:
    """Whether the compiled extension is built and loaded (builds it on the first call; False when disabled)."""
    return load_all()


def has_op(op: str, device_type: str = "cpu") -> bool:
    """Whether ``torch.ops.rlhf_engine.<op>`` has a kernel for ``device_type`` (``"cpu"`` or ``"cuda"``), building
    the extension first if needed."""
    if not enabled():
        return False
    key = f"{op}:{device_type}"
    found = _ops.get(key)
    if found is None:
        load_all()
        found = hasattr(getattr(torch.ops, NAMESPACE), op) and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"{NAMESPACE}::{op}", "CUDA" if device_type == "cuda" else "CPU")
        _ops[key] = found
    return found


def op(name: str):
    """``torch.ops.rlhf_engine.<name>``; raises AttributeError when the extension lacks it."""
    load_all()
    return getattr(getattr(torch.ops, NAMESPACE), name)


def extension_error() -> str | None:
    """The build errors of this process, or None."""
    return "\n\n".join(f"{k}: {v}" for k, v in _errors.items()) or None


def status() -> dict[str, object]:
    """For ``rlhf-engine env`` and bench JSON: enabled, loaded libraries, errors, cache dir."""
    return {"enabled": enabled(), "libraries": dict(_loaded), "errors": dict(_errors), "cache": str(build_root())}
