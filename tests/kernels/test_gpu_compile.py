"""Every Triton kernel compiles for an H100 (sm_90), for every variant its launcher produces, without a GPU.

The other kernel tests run the kernels in Triton's CPU interpreter, which does not lower them and so misses GPU-only
compile errors (loop-carried type changes, constexpr misuse, int32/int64 mixing, ops without a lowering). This test
runs ``tests/gpu_compile_check.py``, which AOT-compiles each variant down to a cubin with ptxas; see its docstring
for the variant table. It runs in a subprocess because ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` in this
process, and under the interpreter ``triton.jit`` returns interpreter functions that cannot be compiled.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_compile_check.py"
SKIP_RC = 3  # gpu_compile_check.py: nothing can be compiled here (no triton, no NVIDIA backend, no ptxas)
TIMEOUT_S = 600


def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a fresh cache: every variant really compiles
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT)], check=False, env=env, cwd=SCRIPT.parents[1],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        so_far = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"gpu_compile_check.py ran past {TIMEOUT_S}s; output so far:\n{so_far}")
    output = proc.stdout + proc.stderr
    if proc.returncode == SKIP_RC:
        reason = next((line for line in output.splitlines() if line.startswith("SKIP:")), output.strip())
        pytest.skip(reason)
    assert proc.returncode == 0, f"gpu_compile_check.py exited with {proc.returncode}:\n{output[-30000:]}"
