"""macft report: the page shows a run's figures; what a summary holds is text, never HTML."""

import json
import shutil

from click.testing import CliRunner
from helpers import save_tiny_model_dir, train_args, write_chat

from macft.cli import cli


def test_values_from_eval_summaries_are_escaped_and_odd_ones_left_out(tmp_path):
    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_chat(tmp_path / "d.jsonl", n=8)
    run = tmp_path / "run"
    trained = CliRunner().invoke(cli, train_args(model, data, run, "--set", "train.iters=2"))
    assert trained.exit_code == 0, trained.output
    evaluated = CliRunner().invoke(cli, ["eval", str(run), "--data", str(data), "--metric", "all"])
    assert evaluated.exit_code == 0, evaluated.output
    summary = next((run / "eval").glob("*.summary.json"))
    s = json.loads(summary.read_text())
    s["format"] = "<script>alert('format')</script>"
    s["loss"]["examples"] = "<img src=x onerror=alert(1)>"
    s["generation"]["examples"] = "<b>answers</b>"
    summary.write_text(json.dumps(s))
    odd = shutil.copy(summary, run / "eval" / "odd.summary.json")
    odd_s = {**s, "forgetting": {"change_pct": "lots"}}  # a number the page formats
    (run / "eval" / "odd.summary.json").write_text(json.dumps(odd_s))
    result = CliRunner().invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    for raw in ("<script>alert", "<img src=x", "<b>answers</b>"):
        assert raw not in page, raw
    assert "&lt;script&gt;alert" in page and "&lt;b&gt;answers&lt;/b&gt;" in page
    assert f"{odd.name}: not a summary macft eval wrote" in page
