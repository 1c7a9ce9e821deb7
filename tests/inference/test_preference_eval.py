"""`macft eval RUN --data pairs.jsonl` after a DPO run through the CLI: base and fine-tune
compared on each pair, figures against a direct computation, the chosen side's loss and answers."""

import contextlib
import json

import pytest
from click.testing import CliRunner
from helpers import assert_documented_keys, train_args

from macft.cli import cli
from macft.data.batches import make_pair_batch
from macft.data.dataset import load_data
from macft.lora.apply import lora_disabled
from macft.runs.model import load_run_model
from macft.train.preference import row_logps

PAIRS = [
    ("list interfaces on cisco ios?", "show ip interface brief", "show interfaces all"),
    ("show routes in junos?", "show route", "show ip route"),
    ("save the config on cisco ios?", "copy running-config startup-config", "write config"),
    ("show bgp summary in junos?", "show bgp summary", "show bgp neighbors"),
]


def write_pairs(path, n):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    path.write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(n)))
    return path


def test_dpo_run_then_eval_on_pairs(tiny_model_dir, tmp_path):
    data, out = write_pairs(tmp_path / "pairs.jsonl", 8), tmp_path / "run"
    sets = ["train.method=dpo", "train.beta=0.5", "train.iters=6", "train.eval_every=3"]
    args = train_args(tiny_model_dir, data, out, *(x for s in sets for x in ("--set", s)))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "reward acc" in result.output  # the progress line
    assert ", DPO beta 0.5" in result.output  # the schedule line names the loss
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp"} <= set(records[-1])

    held = write_pairs(tmp_path / "held.jsonl", 4)
    result = CliRunner().invoke(cli, ["eval", str(out), "--data", str(held), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert_documented_keys(summary, "eval")
    pref = summary["preference"]
    assert pref["pairs"] == 4 and pref["beta"] == 0.5
    assert "chosen more likely (4 pairs)" in result.stderr

    # the same figures, computed directly on the run's model
    cm = load_run_model(str(out))
    cm.model.eval()
    pairs, _, _ = load_data(held, cm.tokenizer, 2048, 0.0, 0, method="dpo")
    margins = {}
    for side in ("base", "fine_tune"):
        with lora_disabled(cm.model) if side == "base" else contextlib.nullcontext():
            lp, _ = row_logps(cm.model, make_pair_batch(pairs, 0))
        margins[side] = [float(lp[i] - lp[i + 4]) for i in range(4)]
        assert pref[side]["accuracy"] == sum(m > 0 for m in margins[side]) / 4
        assert pref[side]["margin"] == pytest.approx(sum(margins[side]) / 4, abs=1e-3)
    reward = [0.5 * (t - b) for t, b in zip(margins["fine_tune"], margins["base"], strict=True)]
    assert pref["fine_tune"]["reward_margin"] == pytest.approx(sum(reward) / 4, abs=1e-3)
    assert pref["fine_tune"]["reward_margin"] > 0  # trained on these very pairs
    # the chosen answers are the held-out loss's targets
    assert summary["loss"]["examples"] == 4 and summary["format"] == "preference"

    # macft report plots the reward curves and shows the pairs' table
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "<figcaption>reward accuracy</figcaption>" in page
    assert "<figcaption>reward margin</figcaption>" in page
    assert "chosen more likely (4 pairs)" in page
