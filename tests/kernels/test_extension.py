"""The compiled extension (csrc/, kernels/_extension.py): it builds where a compiler exists, a failed build falls back
with one warning, RLHF_ENGINE_BUILD_EXT=0 turns it off, its host code rejects bad arguments by name, and its CUDA
sources compile for sm_90 with nvcc (no GPU needed). The ops' numerics are tested with each op (the "cpp" backend)."""

import shutil
import subprocess
import warnings

import pytest
import torch

from kernels import _backend, _extension
from kernels.gae import discounted_returns


def test_extension_builds_where_enabled():
    # CI machines have g++: a build failure must fail here, not silently skip the "cpp" backend tests
    if not _extension.enabled():
        pytest.skip("RLHF_ENGINE_BUILD_EXT=0")
    assert _extension.has_extension(), _extension.extension_error()
    assert _extension.has_op("gae") and _extension.has_op("race_sample")
    assert not _extension.has_op("no_such_op")
    status = _extension.status()
    assert status["enabled"] and all(status["libraries"].values()) and not status["errors"]


def test_disabled_extension_is_never_used(monkeypatch):
    monkeypatch.setenv(_extension.ENV_BUILD, "0")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert not _extension.has_extension() and not _extension.has_op("gae")
    assert _backend.select_backend("gae", torch.zeros(2, 3)) == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    with pytest.raises(RuntimeError, match="no cpu kernel for op 'discounted_returns' \\(enabled: False"):
        discounted_returns(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    src = tmp_path / "csrc" / "cpu"
    src.mkdir(parents=True)
    (src / "broken.cpp").write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(_extension, "CSRC", tmp_path / "csrc")
    for name, fresh in (("_loaded", {}), ("_errors", {}), ("_ops", {}), ("_done", False)):
        monkeypatch.setattr(_extension, name, fresh)
    monkeypatch.setenv(_extension.ENV_DIR, str(tmp_path / "build"))
    monkeypatch.setenv(_extension.ENV_BUILD, "1")
    with pytest.warns(RuntimeWarning, match="rlhf_engine_broken did not build"):
        assert not _extension.load_all()
    assert "deliberately broken" in _extension.extension_error()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second build, no second warning
        assert not _extension.load_all()


@pytest.fixture
def ext():
    if not _extension.enabled():
        pytest.skip("RLHF_ENGINE_BUILD_EXT=0")
    assert _extension.has_extension(), _extension.extension_error()
    return torch.ops.rlhf_engine


def test_host_checks_name_the_argument(ext):
    r = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="response_mask must be Bool, got Float"):
        ext.gae(r, r, torch.ones(2, 3), 1.0, 1.0, True)
    with pytest.raises(ValueError, match=r"values must have the shape of token_level_rewards \[2, 3\], got \[3, 2\]"):
        ext.gae(r, torch.zeros(3, 2), torch.ones(2, 3, dtype=torch.bool), 1.0, 1.0, True)
    with pytest.raises(ValueError, match="token_level_rewards must be 2-D, got shape \\[6\\]"):
        ext.discounted_returns(torch.zeros(6), torch.ones(6, dtype=torch.bool), 1.0)
    logits, keys = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature must have shape \(4,\) like logits' rows, got \[3\]"):
        ext.race_sample(logits, torch.ones(3), keys, keys)
    with pytest.raises(TypeError, match="ka must be Long, got Int"):
        ext.race_sample(logits, torch.ones(4), keys.int(), keys)
    with pytest.raises(ValueError, match="unit column stride"):
        ext.race_sample(torch.zeros(10, 4).t(), torch.ones(4), keys, keys)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source", sorted((_extension.CSRC / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_for_sm90(source, tmp_path):
    # the kernels are plain CUDA (torch's CUDA headers are absent from a CPU wheel): nvcc alone compiles them
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-c", str(source), "-o", str(tmp_path / "k.o"),
           "-I", str(_extension.CSRC / "cuda")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("S", [1, 3, 64])
@pytest.mark.parametrize("V", [1, 37, 5000, 151_936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_race_sample_draws_what_the_eager_sampler_draws(monkeypatch, S, V, dtype):
    from engine.generation.sampler import _row_keys, sample

    if not _extension.has_op("race_sample", "cuda"):
        pytest.fail(f"no CUDA race_sample: {_extension.extension_error()}")
    g = torch.Generator().manual_seed(V + S)
    logits = (torch.randn(S, V + 3, generator=g) * 3).to(dtype).cuda()[:, 1:V + 1]
    temperature = (torch.rand(S, generator=g) * 2).cuda()
    temperature[0] = 0.0
    seeds = torch.randint(0, 2**62, (S,), generator=g).cuda()
    positions = torch.randint(0, 10_000, (S,), generator=g).cuda()
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    tok_ref, lp_ref = sample(logits, temperature, None, None, seeds, positions)
    ka, kb = _row_keys(seeds, positions)
    op = torch.ops.rlhf_engine.race_sample
    torch.cuda.set_sync_debug_mode("error")  # no host synchronisation inside the op
    try:
        tok, lp = op(logits, temperature, ka, kb)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tok.tolist() == tok_ref.tolist()
    torch.testing.assert_close(lp, lp_ref.float(), rtol=1e-5, atol=1e-4)
    graph = torch.cuda.CUDAGraph()  # capturable, and a replay draws the same tokens
    with torch.cuda.graph(graph):
        tok_g, lp_g = op(logits, temperature, ka, kb)
    graph.replay()
    assert tok_g.tolist() == tok.tolist() and torch.equal(lp_g, lp)


def test_every_compiled_op_has_a_shape_function(ext):
    # torch.compile traces a custom op through its fake kernel: a new op without one would break compilation
    from kernels import _fake_ops

    ops = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
           if n.startswith("rlhf_engine::")}
    assert ops and ops <= set(_fake_ops.FAKES), sorted(ops - set(_fake_ops.FAKES))


def test_compiled_ops_run_under_torch_compile(ext):
    r, v = torch.randn(3, 7), torch.randn(3, 7)
    m = torch.rand(3, 7) > 0.3
    fn = torch.compile(lambda r, v, m: ext.gae(r, v, m, 0.9, 0.8, True)[0] * 2.0, fullgraph=True)
    torch.testing.assert_close(fn(r, v, m), ext.gae(r, v, m, 0.9, 0.8, True)[0] * 2.0)
