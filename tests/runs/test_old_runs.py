"""A run folder written by an earlier macft still resumes, exactly.

old_run_c936b6d/ is a run that macft at commit c936b6d wrote and Ctrl-C stopped at step 4 of 8
(tiny model of helpers.py, write_chat(n=12), the settings below): no data digest in its
state.json, the temp-file names and JSON of that version. Only its two paths are rewritten to
where this test puts the same model and data. That macft trained on the CPU's path (a float32
copy), so the run it is compared with takes the same path.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import save_tiny_model_dir, write_chat

from macft.cli import cli
from macft.runs.folder import RunDir
from macft.train.progress import TrainProgress

OLD_RUN = Path(__file__).parent / "old_run_c936b6d"
SETS = ["model.compute=float32", "train.batch_size=2", "train.grad_accumulation=2",
        "train.grad_checkpoint=false", "lora.rank=2", "lora.targets=attention",
        "lora.dropout=0.1", "train.iters=8", "train.save_every=2", "train.eval_every=2",
        "train.report_every=1", "train.learning_rate=1e-2", "train.warmup=2"]  # fmt: skip
SET_ARGS = [x for s in SETS for x in ("--set", s)]


def curve(run: Path) -> dict:
    return {r["step"]: (r.get("train_loss"), r.get("val_loss")) for r in RunDir(run).read_metrics()}


def train(*args: str) -> None:
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 0, result.output


@pytest.mark.path("cpu")
def test_a_run_written_by_c936b6d_resumes_like_a_checkpoint_of_this_version(tmp_path, monkeypatch):
    """The old folder, resumed, ends bit for bit where a run this version stopped at step 4 ends
    when it holds the old run's step-4 numbers. Both start from the same numbers because another
    CPU rounds float32 differently (OpenBLAS picks its kernels by CPU): this version's own first
    4 steps come within 1e-4 of the fixture's, and lr 1e-2 grows that to ~0.02 by step 8."""
    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_chat(tmp_path / "net.jsonl", n=12)
    old = Path(shutil.copytree(OLD_RUN, tmp_path / "old"))
    recipe = yaml.safe_load((old / "recipe.yaml").read_text())
    recipe["model"]["path"], recipe["data"]["path"], recipe["out"] = str(model), str(data), str(old)
    (old / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert "data_digest" not in json.loads((old / "state.json").read_text())
    train("--resume", "--out", str(old))
    assert RunDir(old).state["status"] == "finished" and RunDir(old).state["data_digest"]

    # This version's run, stopped by a Ctrl-C at step 4 as the old one was.
    new = tmp_path / "new"
    with monkeypatch.context() as m:
        m.setattr(TrainProgress, "on_report", stop_at_step_4)
        train("--model", str(model), "--data", str(data), "--out", str(new), *SET_ARGS)
    assert RunDir(new).state["status"] == "interrupted" and RunDir(new).state["step"] == 4
    ckpt, old_ckpt = new / "checkpoints" / "step-000004", OLD_RUN / "checkpoints" / "step-000004"
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        mine, theirs = mx.load(str(ckpt / name)), mx.load(str(old_ckpt / name))
        assert sorted(mine) == sorted(theirs), name  # the same tensors under the same names
        for k in mine:
            np.testing.assert_allclose(np.array(theirs[k]), np.array(mine[k]), atol=1e-4)
        shutil.copy(old_ckpt / name, ckpt / name)
    train("--resume", "--out", str(new))

    want, got = (
        mx.load(str(new / "adapters.safetensors")),
        mx.load(str(old / "adapters.safetensors")),
    )
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]), err_msg=k)
    resumed = {s: v for s, v in curve(old).items() if s > 4}
    assert sorted(resumed) == [5, 6, 7, 8] and resumed == {s: curve(new)[s] for s in resumed}


def stop_at_step_4(self, record: dict) -> None:
    if record["step"] == 4:
        raise KeyboardInterrupt
