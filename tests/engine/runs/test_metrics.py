"""engine.runs.metrics and .vocabulary: the metrics.jsonl logger, ``rlhf-engine plot`` and the one metric vocabulary."""

import json
from pathlib import Path

import pytest

from engine.runs.metrics import PLOTTED, MetricsLogger, plot_run, read_metrics
from engine.runs.vocabulary import known, markdown_table


def test_logger_writes_one_json_line_per_step(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"reward": 0.5, "kl": 0.01})
    logger.log(2, {"reward": 0.75, "kl": 0.02})
    logger.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["reward"] == 0.75 and rows[1]["kl"] == 0.02


@pytest.mark.parametrize("kind, metrics", [
    ("ppo", {"reward": -1.5, "objective/kl": 0.1, "completions/mean_length": 20.0, "critic/vf_loss": 0.3}),
    ("rm", {"loss": 0.69, "eval/accuracy": 0.6, "eval/loss": 0.68}),
    ("dpo", {"loss": 0.69, "eval/rewards/accuracies": 0.55}),
])
def test_plot_draws_the_panels_a_run_has(tmp_path, kind, metrics):
    pytest.importorskip("matplotlib")
    lines = [json.dumps({"step": s, **{k: v + 0.01 * s for k, v in metrics.items()}}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 1000
    assert set(metrics) <= set(PLOTTED)


def test_every_plotted_metric_is_in_the_vocabulary():
    assert all(known(name) for name in PLOTTED)
    assert not known("response_length/mean") and not known("actor/pg_loss")  # veRL's names are only mapped to


def test_the_readme_table_is_the_vocabulary():
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    assert markdown_table() in readme, "README's metrics table is stale: paste engine.runs.vocabulary.markdown_table()"


def test_plot_without_any_plotted_metric_names_them(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "something_else": 1.0}) + "\n")
    with pytest.raises(ValueError, match="none of the plotted metrics"):
        plot_run(tmp_path)
