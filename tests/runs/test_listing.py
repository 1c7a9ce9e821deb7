"""`macft runs`: finds run folders, tells running from crashed by the lock, reports the figures."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from helpers import save_tiny_model_dir, train_args, write_chat

from macft.atomic import human
from macft.cli import cli
from macft.runs.folder import RunDir
from macft.runs.listing import human_age


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = save_tiny_model_dir(root / "tiny")
    data = write_chat(root / "net.jsonl", n=12)
    run = root / "finished"
    args = train_args(model, data, run, "--set", "train.iters=4", "--set", "train.eval_every=2")
    result = CliRunner().invoke(cli, args + ["--set", "train.save_every=2"])
    assert result.exit_code == 0, result.output
    return run


def rows(*args):
    result = CliRunner().invoke(cli, ["runs", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return {os.path.basename(r["path"]): r for r in json.loads(result.output)}


def test_states_steps_losses_and_sizes(finished, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(finished, runs / "done")
    for name, status in (("crashed", "running"), ("stopped", "interrupted"), ("failed", "failed")):
        shutil.copytree(finished, runs / "group" / name)  # found one level deeper too
        RunDir(runs / "group" / name).update_state(status=status, step=2)
    shutil.copytree(finished, runs / "live")
    RunDir(runs / "live").update_state(status="running", step=2)
    (runs / "not-a-run").mkdir()
    (runs / "not-a-run" / "notes.txt").write_text("x")

    with RunDir(runs / "live").lock():  # a training holds it
        found = rows(runs)
    assert sorted(found) == ["crashed", "done", "failed", "live", "stopped"]
    states = {name: r["state"] for name, r in found.items()}
    assert states == {
        "done": "finished",
        "crashed": "crashed",  # says running, but nobody holds the lock
        "live": "running",
        "stopped": "interrupted",
        "failed": "failed",
    }
    done = found["done"]
    metrics = RunDir(finished).read_metrics()
    vals = [(r["val_loss"], r["step"]) for r in metrics if "val_loss" in r and r["step"] > 0]
    assert (done["best_val_loss"], done["best_step"]) == min(vals)
    assert done["best_val_loss"] == RunDir(finished).state["best_val_loss"]
    assert done["last_val_loss"] == vals[-1][0]
    assert (done["step"], done["total_steps"]) == (4, 4)
    on_disk = sum(p.stat().st_size for p in (runs / "done").rglob("*") if p.is_file())
    assert done["size_bytes"] == on_disk > 0
    assert 0 <= done["age_s"] < 600
    # metrics written past the last state update still count as progress
    assert found["crashed"]["step"] == 4


def test_table_names_each_run_and_says_how_to_continue(finished, tmp_path, monkeypatch):
    shutil.copytree(finished, tmp_path / "runs" / "net")
    RunDir(tmp_path / "runs" / "net").update_state(status="running")
    monkeypatch.chdir(tmp_path)  # default: ./runs
    result = CliRunner().invoke(cli, ["runs"])
    assert result.exit_code == 0, result.output
    assert "runs/net" in result.output and "crashed" in result.output and "4/4" in result.output
    assert "macft train --resume --out runs/net" in result.output


def test_a_run_folder_itself_and_nothing_found(finished, tmp_path, monkeypatch):
    assert list(rows(finished)) == ["finished"]
    assert rows(tmp_path) == {}
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["runs"])
    assert result.exit_code == 0 and "no runs under ./runs" in result.output


def test_human_figures():
    assert human(1_234_567) == "1.2 MB" and human(999) == "999 B"
    assert human_age(30) == "30s ago" and human_age(7200) == "2h ago"
