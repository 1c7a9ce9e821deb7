"""A run folder written by macft 0.1.0 before the package was reorganised still resumes exactly.

tests/runs/fixtures/run-0.1.0 was made by that version on the tiny model and chat data that
helpers.py builds: 3 steps of a constant-lr run with dropout, a checkpoint at step 3.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from click.testing import CliRunner
from helpers import save_tiny_model_dir, write_chat

from macft.cli import cli
from macft.runs.folder import RunDir

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"


def place_old_run(root: Path) -> Path:
    """The fixture copied under root, its paths pointing at a tiny model and data made here."""
    model = save_tiny_model_dir(root / "tiny")
    data = write_chat(root / "net.jsonl", n=12)
    run = root / "run"
    shutil.copytree(FIXTURE, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["path"], recipe["data"]["path"], recipe["out"] = str(model), str(data), str(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    base = json.loads((run / "base.json").read_text())
    (run / "base.json").write_text(json.dumps({**base, "path": str(model)}))
    return run


@pytest.mark.path("cpu")  # the fixture was trained on the CPU's path (a float32 copy)
def test_a_run_of_the_old_layout_resumes_as_one_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MACFT_NO_CPU_STREAMS", "1")  # as the fixture was made: one stream
    run = place_old_run(tmp_path / "old")
    more = ["--set", "train.iters=6"]
    result = CliRunner().invoke(cli, ["train", "--resume", "--out", str(run), *more])
    assert result.exit_code == 0, result.output
    resumed = RunDir(run)
    assert resumed.state["status"] == "finished" and resumed.state["step"] == 6

    # the same recipe from step 0, in this version
    straight = tmp_path / "straight"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["out"] = str(straight)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["train", "--recipe", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output

    def losses(folder):
        return {r["step"]: r["train_loss"] for r in RunDir(folder).read_metrics() if r["step"]}

    old, new = losses(run), losses(straight)
    assert sorted(old) == sorted(new) == [1, 2, 3, 4, 5, 6]
    for step in new:  # steps 1-3 from the old version, 4-6 resumed from its checkpoint
        assert old[step] == pytest.approx(new[step], rel=1e-4), step
    a = mx.load(str(run / "adapters.safetensors"))
    b = mx.load(str(straight / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-4), k
