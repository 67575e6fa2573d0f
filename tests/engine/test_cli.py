"""Every ``rlhf-engine`` sub-command's happy path through ``engine.cli.main`` (tiny models and budgets), and the
error contract: one line on stderr and exit code 1 by default, the traceback with ``--debug`` or
``RLHF_ENGINE_DEBUG=1`` (issue 9, part 6)."""

from __future__ import annotations

import json

import pytest

from engine.runs.checkpoint import checkpoint_dir, find_latest_checkpoint, is_complete
from engine.cli import main
from engine.runs.metrics import read_metrics
from engine.runs.directory import RunDirectoryError
from tests.engine.trainers.test_rlhf_trainers import write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "model.tiny_overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}"
COMMON = [TINY, "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false", "data.num_eval=4"]


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / 4 for c in completions]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "sft"
    assert main(["sft", f"trainer.output_dir={run}", *COMMON, "sft.max_steps=2", "sft.batch_size=4",
                 "sft.micro_batch_size=4"]) == 0
    return run


def test_sft(sft_run):
    assert is_complete(checkpoint_dir(sft_run, 2))
    assert [r["step"] for r in read_metrics(sft_run)] == [1, 2]


def test_grpo_from_the_sft_run(sft_run, tmp_path):
    assert main(["grpo", f"trainer.output_dir={tmp_path}", *COMMON, f"model.path={sft_run}", "trainer.max_steps=1",
                 "grpo.prompts_per_step=2", "grpo.num_generations=2", "generation.max_tokens=4",
                 f"grpo.rewards=[{__name__}:digit_reward]"]) == 0
    assert is_complete(checkpoint_dir(tmp_path, 1))


def test_generate_prints_one_json_line_per_sample(sft_run, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(sft_run), "--device", "cpu", "--n", "2", "--max-tokens", "3",
                 "--seed", "0", "1+2=", "3+4="]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["request"], r["index"]) for r in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(isinstance(r["text"], str) and r["finish_reason"] in ("stop", "length") for r in lines)


def test_plot(sft_run, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["plot", str(sft_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_env(capsys):
    assert main(["env"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_bench_tables_print_the_peers_tables_of_a_results_file(capsys):
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "bench" / "results" / "peers_cpu.json"
    assert main(["bench", "tables", str(results)]) == 0
    out = capsys.readouterr().out
    assert "**GRPO step**" in out and "| trl_hf_generate |" in out and "**Skipped**" in out


@pytest.mark.parametrize("argv, script", [(["bench", "kernels", "--help"], "bench_kernels.py"),
                                          (["bench", "--help"], "bench_peers.py"),
                                          (["bench", "--sections", "grpo", "--help"], "bench_peers.py")])
def test_bench_names_a_script_and_passes_its_arguments(argv, script, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the script's argparse --help exits 0
        main(argv)
    assert exit_info.value.code == 0 and script in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_pair_trainers(kind, tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=12)
    run = tmp_path / "run"
    assert main([kind, f"trainer.output_dir={run}", f"data.train={data}", *COMMON, f"{kind}.max_steps=1",
                 f"{kind}.batch_size=4", f"{kind}.micro_batch_size=4"]) == 0
    assert is_complete(checkpoint_dir(run, 1))


def test_ppo(tmp_path):
    assert main(["ppo", f"trainer.output_dir={tmp_path}", *COMMON, "trainer.max_steps=1", "generation.max_tokens=4",
                 f"ppo.rewards=[{__name__}:digit_reward]", "ppo.prompts_per_step=4", "ppo.mini_batch_size=4",
                 "ppo.micro_batch_size=4", "ppo.ppo_epochs=1"]) == 0
    assert is_complete(checkpoint_dir(tmp_path, 1)) and (checkpoint_dir(tmp_path, 1) / "critic").is_dir()


def test_demo_with_tiny_budgets(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path), "--sft-max-steps", "2", "--grpo-steps", "1",
                 "--num-eval", "4"]) == 0
    assert find_latest_checkpoint(tmp_path / "sft") is not None and (tmp_path / "grpo" / "curves.png").is_file()
    # GRPO variants from that SFT checkpoint, with config overrides: the recipe comparison of bench/demo_recipes.py
    again = tmp_path / "from_checkpoint"
    assert main(["demo", "--output-dir", str(again), "--sft-checkpoint", str(find_latest_checkpoint(tmp_path / "sft")),
                 "--grpo-steps", "1", "--num-eval", "4", "--grpo-override", "grpo.policy_loss=cispo",
                 "--grpo-override", "grpo.dynamic_sampling=true"]) == 0
    assert not (again / "sft").exists()
    assert "policy_loss: cispo" in next((again / "grpo").glob("config*.yaml")).read_text()


def test_an_error_prints_one_line_and_exits_1(sft_run, capsys, monkeypatch):
    monkeypatch.delenv("RLHF_ENGINE_DEBUG", raising=False)
    capsys.readouterr()
    assert main(["sft", f"trainer.output_dir={sft_run}", *COMMON]) == 1  # a fresh start into a used directory
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlhf-engine: error: ") and "already holds a run" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["flag_before", "flag_after", "env"])
def test_debug_shows_the_traceback(sft_run, monkeypatch, how):
    argv = ["sft", f"trainer.output_dir={sft_run}", *COMMON]
    if how == "env":
        monkeypatch.setenv("RLHF_ENGINE_DEBUG", "1")
    else:
        monkeypatch.delenv("RLHF_ENGINE_DEBUG", raising=False)
        argv = ["--debug", *argv] if how == "flag_before" else [*argv, "--debug"]
    with pytest.raises(RunDirectoryError):
        main(argv)
