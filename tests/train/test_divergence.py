"""A diverging run: steps with a NaN or infinite loss or gradient are skipped and counted;
several in a row stop the run with one line; nothing NaN is ever written; JSON stays strict."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    PAD,
    Ex,
    Reports,
    lora_model,
    new_run,
    save_tiny_model_dir,
    train_args,
    train_config,
    write_chat,
)

from macft.cli import cli
from macft.data.batches import batch_order
from macft.runs.folder import RunDir
from macft.train.loop import train

POISON = 200  # a token whose embedding row is made infinite: every loss that sees it is NaN


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""

    def refuse(token):
        raise ValueError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def all_finite(path) -> bool:
    return all(bool(mx.isfinite(v).all()) for v in mx.load(str(path)).values())


def examples(n_good: int, bad_at: set[int]) -> list[Ex]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_good + len(bad_at)):
        ids = rng.integers(3, 50, 12).astype(np.int32)
        if i in bad_at:
            ids[6] = POISON
        out.append(Ex(ids, np.arange(12) >= 3))
    return out


def poison(model) -> None:
    weight = np.array(model.model.embed_tokens.weight)
    weight[POISON] = np.inf
    model.model.embed_tokens.weight = mx.array(weight)


def test_non_finite_steps_are_skipped_counted_and_never_written(tmp_path):
    data = examples(8, bad_at={2, 7})  # 10 examples, batch 1: 10 steps, two of them NaN
    model, info = lora_model()
    poison(model)
    cfg = train_config(iters=10, batch_size=1, eval_every=3, save_every=2, report_every=1,
                       learning_rate=1e-2, warmup=0)  # fmt: skip
    run, reports = new_run(tmp_path), Reports()
    result = train(model, data, examples(3, set()), cfg, run, PAD, callback=reports,
                   lora_info=info)  # fmt: skip
    order = batch_order(len(data), 1, cfg.seed, 0, [len(e.ids) for e in data])
    skipped = [step for step, (i,) in enumerate(order, 1) if i in (2, 7)]
    assert result.status == "finished" and result.step == 10
    assert [s for s, loss in result.losses.items() if np.isnan(loss)] == skipped
    assert all(np.isfinite(loss) for s, loss in result.losses.items() if s not in skipped)
    # counted in the metrics, from the first skipped step on
    records = [strict_json(line) for line in run.metrics_path.read_text().splitlines()]
    assert records == reports.records
    assert records[-1]["skipped_steps"] == 2
    assert [r["step"] for r in records if "skipped_steps" in r][0] == skipped[0]
    assert all(r["train_loss"] is None or np.isfinite(r["train_loss"]) for r in records)
    # every file written holds finite weights; state.json is strict JSON
    written = [run.adapters_path, run.best / "adapters.safetensors"]
    for ckpt in run.list_checkpoints():
        written += [ckpt / "adapters.safetensors", ckpt / "optimizer.safetensors"]
    assert len(written) >= 5 and all(all_finite(p) for p in written)
    assert strict_json(run.state_path.read_text())["status"] == "finished"


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_good_files(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    data, out = write_chat(tmp_path / "net.jsonl", n=12), tmp_path / "run"
    sets = [
        "--set",
        "train.iters=4",
        "--set",
        "train.save_every=2",
        "--set",
        "train.report_every=1",
    ]
    first = CliRunner().invoke(cli, train_args(model, data, out, *sets))
    assert first.exit_code == 0, first.output
    kept = [out / "adapters.safetensors", *(out / "checkpoints/step-000004").iterdir()]
    good = {p: p.read_bytes() for p in kept}
    # the base goes bad (an infinite weight): every loss from now on is NaN
    weights = mx.load(str(model / "model.safetensors"))
    weights["model.norm.weight"] = mx.full(weights["model.norm.weight"].shape, np.inf)
    mx.save_safetensors(str(model / "model.safetensors"), weights)

    more = ["train", "--resume", "--out", str(out), "--set", "train.iters=40"]
    result = CliRunner().invoke(cli, more)
    lines = result.output.rstrip().splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert sum(line.startswith("Error:") for line in lines) == 1
    assert lines[-1].startswith("Error: training diverged at step 9: ")
    for needle in ("NaN or infinite in 5 steps in a row", "lower train.learning_rate (now 0.01)",
                   f"macft train --resume --out {out}", "--force"):  # fmt: skip
        assert needle in lines[-1], needle
    state = strict_json((out / "state.json").read_text())
    assert state["status"] == "failed" and "diverged" in state["error"] and state["step"] == 9
    # the good files are as they were; anything written since holds the same finite weights
    assert all(p.read_bytes() == data for p, data in good.items())
    assert [p.name for p in RunDir(out).list_checkpoints()][-1] == "step-000008"
    assert all(all_finite(p) for p in out.rglob("*.safetensors"))
    metrics = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 9 and metrics[-1]["skipped_steps"] == 5


class CtrlCInBestSave:
    """Ctrl-C lands while checkpoints/best is being written for the second time."""

    def __init__(self, run: RunDir):
        self.real, self.calls = run.save_best, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_the_best_step_recorded_is_the_one_checkpoints_best_holds(tmp_path):
    data = examples(8, set())
    model, info = lora_model()
    cfg = train_config(iters=8, batch_size=2, eval_every=1, save_every=0, learning_rate=1e-2,
                       warmup=0)  # fmt: skip
    run = new_run(tmp_path)
    run.save_best = CtrlCInBestSave(run)
    result = train(model, data, data[:4], cfg, run, PAD, lora_info=info)
    assert result.status == "interrupted"
    held = json.loads((run.best / "state.json").read_text())["step"]
    _, _, saved = run.load_checkpoint(run.latest_checkpoint())
    assert saved["best_step"] == held == run.state["best_step"]


@pytest.mark.parametrize(
    "setting", ["learning_rate=nan", "max_grad_norm=.nan", "epochs=.inf", "min_lr_ratio=.nan"]
)
def test_recipes_refuse_nan_and_infinity(tmp_path, setting):
    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_chat(tmp_path / "d.jsonl", n=4)
    args = train_args(model, data, tmp_path / "run", "--set", f"train.{setting}")
    result = CliRunner().invoke(cli, args)
    key = setting.split("=")[0]
    assert result.exit_code == 1, result.output
    assert f"train.{key}: expected a finite number" in result.output.splitlines()[-1]
    assert not (tmp_path / "run").exists()
