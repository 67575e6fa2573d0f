"""Smoke test of ``bench/bench_peers.py``: every section at a tiny shape (a tiny random model, a GSM8K-shaped file of
made-up questions, 2 prompts x 2 samples), the JSON's keys, a missing peer reported as skipped, and the README tables
rendered from the JSON. Timings are not checked."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None  # a bench extra, not a test dependency

import huggingface_hub.constants  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny", "--vocab", "300", "--prompts", "2", "--n", "2", "--max-tokens", "8", "--micro-batch", "2",
        "--warmup", "1", "--repeats", "1", "--loss-reps", "1", "--gen-repeats", "1", "--loss-shapes", "2x16x32x64",
        "--dpo-shapes", "2x16x32x64", "--gen-shape", "2x2x8x8", "--no-compile", "--no-hf-static", "--threads", "1",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def bench():
    """The script as a module; the environment variables it sets on import are restored."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TRL_EXPERIMENTAL_SILENCE"):
            mp.setenv(name, os.environ.get(name, ""))  # records the original value (or its absence) for the undo
            mp.delenv(name)  # the import's setdefault then applies, until the undo
        sys.path.insert(0, str(ROOT / "bench"))
        spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "bench_peers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """GSM8K's layout (``train.jsonl``/``test.jsonl`` of ``question``, ``answer`` ending in ``#### N``), made up."""
    path = tmp_path_factory.mktemp("gsm8k")
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(3, 9) for b in range(2, 6)]
    for split in ("train", "test"):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _main(bench, argv):
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL pings the Hub on init
        mp.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's warning
        try:
            return bench.main(argv)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(bench, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers") / "peers.json"
    data = _main(bench, TINY + ["--data", str(data_dir), "--out", str(out)])
    return data, out


def test_every_section_runs_and_writes_its_keys(run):
    data, out = run
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    for key in ("device", "torch", "triton", "transformers", "trl", "liger_kernel", "cpu_threads", "dtype", "args",
                "sections", "skipped", "png"):
        assert key in data, key
    assert Path(data["png"]).stat().st_size > 0
    grpo = data["sections"]["grpo"]
    assert [r["impl"] for r in grpo["rows"]] == ["ours", "ours_packed", "trl_hf_generate", "trl_our_generator",
                                                 "trl_our_generator_and_head"]
    for r in grpo["rows"]:
        assert r["output_tokens"] == 2 * 2 * 8 or r["output_tokens"] > 0  # EOS may stop a sample early
        assert 0 < r["generate_s"] < r["step_s"] and r["update_s"] > 0 and r["tokens_per_s"] > 0
        assert len(r["runs"]) == 2 and r["runs"][0]["warmup"] and not r["runs"][1]["warmup"]
        assert r["ours_speedup"] > 0 and r["ours_speedup_paired"] > 0
        assert r["ours_generate_speedup"] > 0 and r["ours_update_speedup"] > 0
    assert grpo["rows"][0]["ours_speedup"] == grpo["rows"][0]["ours_speedup_paired"] == 1.0
    assert grpo["ours_packed_overrides"].startswith("grpo.max_tokens_per_micro_batch=")
    assert grpo["shape"]["prompts"] == 2 and grpo["shape"]["n"] == 2 and grpo["shape"]["max_tokens"] == 8
    losses = data["sections"]["losses"]["rows"]
    impls = {"ours", "eager", "trl_chunked", "trl_selective"} | ({"liger"} if HAS_LIGER else set())
    for kind in ("grpo", "dpo"):
        assert {r["impl"] for r in losses if r["loss"] == kind} == impls
    for r in losses:
        assert r["median_ms"] > 0 and r["peak_mib"] >= 0 and r["ours_speedup"] > 0 and r["shape"] == "2x16x32x64"
    gen = data["sections"]["generate"]["rows"]
    assert [r["impl"] for r in gen] == ["ours", "hf_generate"] and all(r["output_tokens"] == 2 * 2 * 8 for r in gen)
    skipped = {(s["section"], s["impl"]) for s in data["skipped"]}
    assert {("losses", "grpo/compile"), ("losses", "dpo/compile"), ("generate", "hf_static_compile")} <= skipped
    if not HAS_LIGER:  # reported, not silently dropped
        assert {("losses", "grpo/liger"), ("losses", "dpo/liger")} <= skipped


def test_a_missing_peer_is_reported_as_skipped(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # "import liger_kernel" raises ImportError
    out = tmp_path / "peers.json"
    data = _main(bench, TINY + ["--sections", "losses", "--without", "trl", "--out", str(out)])
    reasons = {s["impl"]: s["reason"] for s in data["skipped"] if s["section"] == "losses"}
    for kind in ("grpo", "dpo"):
        assert "not installed" in reasons[f"{kind}/liger"]
        assert "--without trl" in reasons[f"{kind}/trl_chunked"] and f"{kind}/trl_selective" in reasons
    assert {r["impl"] for r in data["sections"]["losses"]["rows"]} == {"ours", "eager"}
    assert "grpo" not in data["sections"] and "generate" not in data["sections"]


def test_markdown_tables_render_from_the_json(bench, run, capsys):
    _, out = run
    capsys.readouterr()
    assert _main(bench, ["--markdown", str(out)]) is None
    text = capsys.readouterr().out
    for heading in ("**GRPO step**", "**Losses**", "**Generation**", "**Skipped**"):
        assert heading in text
    assert "| trl_hf_generate |" in text
    assert ("| grpo | 2x16x32x64 | liger |" if HAS_LIGER else "| losses | grpo/liger |") in text
    assert text == bench.render_markdown(json.loads(out.read_text())) + "\n"
