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

OLD_RUN = Path(__file__).parent / "old_run_c936b6d"
SETS = ["model.compute=float32", "train.batch_size=2", "train.grad_accumulation=2",
        "train.grad_checkpoint=false", "lora.rank=2", "lora.targets=attention",
        "lora.dropout=0.1", "train.iters=8", "train.save_every=2", "train.eval_every=2",
        "train.report_every=1", "train.learning_rate=1e-2", "train.warmup=2"]  # fmt: skip


def curve(run: Path) -> dict:
    return {r["step"]: (r.get("train_loss"), r.get("val_loss")) for r in RunDir(run).read_metrics()}


@pytest.mark.path("cpu")
def test_a_run_written_by_c936b6d_resumes_to_an_uninterrupted_runs_adapters(tmp_path):
    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_chat(tmp_path / "net.jsonl", n=12)
    old = Path(shutil.copytree(OLD_RUN, tmp_path / "old"))
    recipe = yaml.safe_load((old / "recipe.yaml").read_text())
    recipe["model"]["path"], recipe["data"]["path"], recipe["out"] = str(model), str(data), str(old)
    (old / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert "data_digest" not in json.loads((old / "state.json").read_text())

    resumed = CliRunner().invoke(cli, ["train", "--resume", "--out", str(old)])
    assert resumed.exit_code == 0, resumed.output
    assert RunDir(old).state["status"] == "finished" and RunDir(old).state["data_digest"]

    ref = tmp_path / "ref"
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(ref)]
    whole = CliRunner().invoke(cli, [*args, *(x for s in SETS for x in ("--set", s))])
    assert whole.exit_code == 0, whole.output
    want, got = (
        mx.load(str(ref / "adapters.safetensors")),
        mx.load(str(old / "adapters.safetensors")),
    )
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]), err_msg=k)
    assert curve(old) == curve(ref)
