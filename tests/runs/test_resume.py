"""What --resume may change: changed data or settings that change the data order or the
result are refused with the list of what changed, unless --force; where the run ends may change."""

import json

import pytest
from click.testing import CliRunner
from helpers import save_tiny_model_dir, train_args, write_chat

from macft.cli import cli


@pytest.fixture
def run(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    data = write_chat(tmp_path / "net.jsonl", n=12)
    out = tmp_path / "run"
    sets = ("--set", "train.iters=2", "--set", "train.save_every=1")
    result = CliRunner().invoke(cli, train_args(model, data, out, *sets))
    assert result.exit_code == 0, result.output
    return out, data


def resume(out, *sets: str, force=False):
    args = ["train", "--resume", "--out", str(out), *(x for s in sets for x in ("--set", s))]
    return CliRunner().invoke(cli, args + (["--force"] if force else []))


def last_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    return result.output.rstrip().splitlines()[-1]


def test_changed_data_is_refused_unless_forced(run):
    out, data = run
    before = (out / "recipe.yaml").read_text(), (out / "state.json").read_text()
    with data.open("a") as f:  # one more line: the split and the order change
        f.write(data.read_text().splitlines()[0] + "\n")
    line = last_line(resume(out, "train.iters=4"))
    assert line.startswith(f"Error: {out}: cannot resume: the data (its files' contents) changed")
    assert "add --force" in line and "another --out" in line
    assert ((out / "recipe.yaml").read_text(), (out / "state.json").read_text()) == before
    forced = resume(out, "train.iters=4", force=True)
    assert forced.exit_code == 0, forced.output
    # the run now goes on with the new data: a later resume compares with it
    again = resume(out, "train.iters=5")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "state.json").read_text())["step"] == 5


def test_each_setting_that_changes_the_order_or_the_result_is_named(run):
    out, _ = run
    changes = ["train.seed=1", "data.valid_fraction=0.2", "data.max_seq_length=64",
               "train.batch_size=2", "train.grad_accumulation=2"]  # fmt: skip
    line = last_line(resume(out, "train.iters=4", *changes))
    named = [
        "train.seed (0 -> 1)", "data.valid_fraction (0.1 -> 0.2)",
        "data.max_seq_length (2048 -> 64)", "train.batch_size (4 -> 2)",
        "train.grad_accumulation (1 -> 2)",
    ]  # fmt: skip
    for change in named:
        assert change in line, change
    assert "train.iters" not in line  # where the run ends may change
    # how far the run goes and how each step is computed may change
    result = resume(out, "train.iters=3", "train.pack=false", "train.eval_every=1")
    assert result.exit_code == 0, result.output
