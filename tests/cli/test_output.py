"""What the commands print into a pipe or a log, into a terminal, and with --json.

CliRunner's stdout is not a terminal, as a pipe or a log file is not; TTY_COMPATIBLE=1 makes
rich take it for one. Where a real pipe matters, macft runs in a subprocess."""

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import (
    COLOUR,
    assert_documented_keys,
    save_tiny_model_dir,
    train_args,
    write_chat,
)

from macft.cli import cli
from macft.models import catalog
from macft.runs.folder import RunDir
from macft.train.memory import GB

pytestmark = pytest.mark.once  # what reaches a pipe or a terminal: the same on either path

TERMINAL = {"TTY_COMPATIBLE": "1", "TERM": "xterm-256color", "NO_COLOR": None}
DUMB = {"TTY_COMPATIBLE": "1", "TERM": "dumb", "NO_COLOR": None}
# Every line the training log prints starts with one of these: a line that does not is
# a piece of a message broken in two.
LOG_LINE = re.compile(
    r"(macft train -> |recipe: |model: |LoRA rank |data: |note: |schedule: |speed: "
    r"|memory plan: |warning: |validation loss before training: |step \d+/\d+  |done: "
    r"|metrics: )"
)


def invoke(*args, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """A folder whose path alone is wider than 80 columns, where rich used to wrap."""
    path = tmp_path_factory.mktemp("out") / ("a-folder-with-a-long-name-" * 4).strip("-")
    path.mkdir()
    return path


def test_models_rows_hold_whole_repo_ids_and_json_has_the_documented_keys():
    lines = invoke("models").stdout.splitlines()
    for e in catalog.ENTRIES:
        row = [line for line in lines if line.split()[:1] == [e.alias]]
        assert len(row) == 1, (e.alias, lines)
        assert e.hf_repo in row[0] and e.license in row[0]
        assert e.mlx_repo is None or e.mlx_repo in row[0]
    models = json.loads(invoke("models", "--json").stdout)
    assert [m["alias"] for m in models] == [e.alias for e in catalog.ENTRIES]
    assert [m["mlx_repo"] for m in models] == [e.mlx_repo for e in catalog.ENTRIES]
    assert_documented_keys(models, "models")


def test_recipes_rows_hold_whole_descriptions_and_json_has_the_documented_keys():
    recipes = json.loads(invoke("recipes", "--json").stdout)
    assert len(recipes) >= 20
    assert_documented_keys(recipes, "recipes")
    lines = invoke("recipes").stdout.splitlines()
    for r in recipes:
        row = [line for line in lines if line.split()[:1] == [r["name"]]]
        assert len(row) == 1 and row[0].endswith(r["description"]), (r, lines)
        memory = f"{r['memory_gb']} GB" if r["memory_gb"] else "any"
        assert f"  {r['model']}  " in row[0] and f"  {memory}  " in row[0]


def test_plan_lines_are_whole_and_the_table_shows_what_json_says(long_dir):
    model = save_tiny_model_dir(long_dir / "tiny")
    data = write_chat(long_dir / "net.jsonl")
    args = ["plan", "--model", model, "--data", data, "--set", "train.grad_checkpoint=false"]
    lines = invoke(*args).stdout.splitlines()
    plan = json.loads(invoke(*args, "--json").stdout)
    assert_documented_keys(plan, "plan")
    assert lines[0].startswith(f"memory plan for {model} (")
    assert sum(p["bytes"] for p in plan["parts"]) == plan["total_bytes"]
    for p in plan["parts"]:  # the table is the same parts, one whole row each
        want = [p["part"], f"{p['bytes'] / GB:.2f}", *p["what"].split()]
        assert [line.split() for line in lines if line.startswith(p["part"] + " ")] == [want]
    assert plan["with_grad_checkpoint_bytes"] < plan["total_bytes"]
    assert plan["fits"] and plan["to_fit"] == [] and plan["adjusted_recipe"] is None


def test_runs_table_rows_hold_whole_paths(long_dir):
    data = write_chat(long_dir / "runs.jsonl", n=8)
    model = save_tiny_model_dir(long_dir / "tiny-runs")
    run = long_dir / "runs" / "net"
    invoke(*train_args(model, data, run, "--set", "train.iters=2"))
    RunDir(run).update_state(status="interrupted")
    lines = invoke("runs", long_dir / "runs").stdout.splitlines()
    row = [line for line in lines if line.startswith(str(run) + " ")]
    assert len(row) == 1 and row[0].split()[1:3] == ["interrupted", "2/2"], lines
    assert lines[-1] == f"continue a stopped run with: macft train --resume --out {run}"
    found = json.loads(invoke("runs", long_dir / "runs", "--json").stdout)
    assert [r["path"] for r in found] == [str(run)]
    assert_documented_keys(found, "runs")


def test_colours_go_with_no_color_and_a_dumb_terminal_gets_plain_rows(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    data = write_chat(tmp_path / "net.jsonl")
    args = ["plan", "--model", model, "--data", data]
    terminal = invoke(*args, env=TERMINAL).output
    assert COLOUR.search(terminal) and "┃" in terminal  # today's look: colours, a boxed table
    for plain in (["--no-color", *args], [*args, "--no-color"]):
        out = invoke(*plain, env=TERMINAL).output
        assert not COLOUR.search(out) and "┃" in out
    assert not COLOUR.search(invoke(*args, env={**TERMINAL, "NO_COLOR": "1"}).output)
    dumb = invoke(*args, env=DUMB).output
    assert dumb == invoke(*args).output  # as into a pipe: no escapes, no box, nothing wrapped
    assert "\x1b" not in dumb and "┃" not in dumb
    assert dumb.splitlines()[0].startswith(f"memory plan for {model} (")


def _assert_log(output: str, out_dir, metrics: list[dict]) -> None:
    """One whole line per message, one line per progress report, no redraws."""
    assert "\r" not in output and "\x1b" not in output
    lines = output.splitlines()
    broken = [line for line in lines if not LOG_LINE.match(line)]
    assert not broken, output
    reports = [r for r in metrics if r["step"] > 0]
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps == [f"{r['step']}/{metrics[-1]['step']}" for r in reports]
    assert lines[-2].endswith(f"Adapters: {out_dir}/adapters.safetensors")
    assert lines[-1] == f"metrics: {out_dir}/metrics.jsonl   recipe: {out_dir}/recipe.yaml"


@pytest.mark.parametrize("env", [None, DUMB], ids=["pipe", "dumb-terminal"])
def test_training_log_is_one_line_per_message_and_per_report(long_dir, env):
    data = write_chat(long_dir / "log.jsonl", n=16)
    model = save_tiny_model_dir(long_dir / "tiny-log")
    out = long_dir / f"run-{'dumb' if env else 'pipe'}"
    sets = [
        "--set",
        "train.iters=4",
        "--set",
        "train.report_every=1",
        "--set",
        "train.eval_every=2",
    ]
    result = invoke(*train_args(model, data, out, *sets), env=env)
    _assert_log(result.output, out, RunDir(out).read_metrics())
    if env is None:
        return
    live = CliRunner().invoke(
        cli, train_args(model, data, out.with_name("live"), *sets), env=TERMINAL
    )
    assert live.exit_code == 0 and "\r" in live.output and "ETA" in live.output  # the live bar


def test_train_json_is_the_only_thing_on_stdout_and_the_log_goes_to_stderr(long_dir):
    """A real pipe: whatever else writes to the process's stdout would break the JSON."""
    data = write_chat(long_dir / "json.jsonl", n=16)
    model = save_tiny_model_dir(long_dir / "tiny-json")
    out = long_dir / "run-json"
    args = train_args(model, data, out, "--set", "train.iters=3", "--set", "train.report_every=1")
    env = {**os.environ, "MACFT_NO_OPENBLAS": "1"}  # no re-exec: a faster start
    proc = subprocess.run(
        [sys.executable, "-m", "macft", *map(str, args), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert_documented_keys(summary, "train")
    state = RunDir(out).state
    assert summary["status"] == "finished" and summary["step"] == state["step"] == 3
    assert summary["best_val_loss"] == state["best_val_loss"]
    assert summary["adapters"] == f"{out}/adapters.safetensors" and summary["resume"] is None
    assert os.path.isfile(summary["adapters"])
    _assert_log(proc.stderr, out, RunDir(out).read_metrics())
