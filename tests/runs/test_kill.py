"""SIGKILL `macft train` at random moments and resume it each time: the final adapters and the
loss curve equal an uninterrupted run's, and no kill leaves a damaged file under a good name."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
import yaml
from helpers import save_tiny_model_dir, write_chat

from macft.atomic import PAUSE_ENV
from macft.runs.folder import RunDir

ITERS = 30
SETS = {
    "model.compute": "float32",
    "train.batch_size": 2,
    "train.grad_accumulation": 2,
    "train.grad_checkpoint": "false",
    "lora.rank": 4,
    "lora.dropout": 0.1,  # random masks: resume must replay them
    "train.iters": ITERS,
    "train.save_every": 2,
    "train.eval_every": 5,
    "train.report_every": 1,
    "train.learning_rate": 1e-2,
    "train.warmup": 3,
}
PAUSE = "0.05"  # seconds each write waits before its rename, so kills land in that window


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = save_tiny_model_dir(root / "tiny")
    data = write_chat(root / "net.jsonl", n=24)
    return root, model, data


def macft(args: list[str], log, pause: bool = False) -> subprocess.Popen:
    env = {**os.environ, "MACFT_NO_OPENBLAS": "1"}  # no re-exec: a faster start
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = PAUSE
    return subprocess.Popen(
        [sys.executable, "-m", "macft", *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def train_args(model, data, out) -> list[str]:
    sets = [x for k, v in SETS.items() for x in ("--set", f"{k}={v}")]
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *sets]


def wait_for(proc: subprocess.Popen, condition, timeout: float = 60.0) -> bool:
    """Poll until condition() holds (True) or the process exits first (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the training process")


def hidden(folder, prefix: str) -> bool:
    return folder.is_dir() and any(p.name.startswith(prefix) for p in folder.iterdir())


def check_consistent(run: RunDir) -> None:
    """What a kill may leave: temp leftovers, never a damaged file under its real name."""
    json.loads(run.state_path.read_text())
    yaml.safe_load(run.recipe_path.read_text())
    run.read_metrics()
    for ckpt in run.list_checkpoints():
        run.load_checkpoint(ckpt)
    for f in (run.adapters_path, run.checkpoints / "best" / "adapters.safetensors"):
        if f.exists():
            mx.load(str(f))


def curve(run: RunDir) -> dict:
    return {r["step"]: (r.get("train_loss"), r.get("val_loss")) for r in run.read_metrics()}


def test_sigkill_then_resume_equals_an_uninterrupted_run(setup):
    root, model, data = setup
    ref_out, out = root / "ref", root / "killed"
    with open(root / "ref.log", "wb") as log:
        assert macft(train_args(model, data, ref_out), log).wait(timeout=120) == 0
    ref = RunDir(ref_out)

    rng = random.Random(9)
    run = RunDir(out)

    def stamp():
        return run.state_path.stat().st_mtime_ns if run.state_path.exists() else None

    moments = [
        # as training starts: no checkpoint yet, the resume starts over from step 0
        ("start", lambda: True),
        # while checkpoints/best is moved aside and the new one not yet in place
        ("best swap", lambda: hidden(run.checkpoints, ".old-best")),
        # while a checkpoint folder is being written
        ("checkpoint write", lambda: hidden(run.checkpoints, ".tmp-step")),
        ("random", None),
        ("random", None),
    ]
    hit, args = [], train_args(model, data, out)
    for n, (name, condition) in enumerate(moments):
        with open(root / f"kill{n}.log", "wb") as log:
            before = stamp()
            proc = macft(args, log, pause=True)
            landed = False
            try:
                # state.json is rewritten when training (re)starts, after the slow imports
                if not wait_for(proc, lambda b=before: stamp() not in (None, b)):
                    break  # finished before this kill
                if condition is None:
                    time.sleep(rng.uniform(1.0, 3.0))
                    landed = proc.poll() is None
                else:
                    landed = wait_for(proc, condition)
                if landed:
                    proc.send_signal(signal.SIGKILL)
            finally:
                if proc.poll() is None and not landed:
                    proc.kill()  # a failed wait: do not leave it running
                proc.wait(timeout=60)
        if proc.returncode != -signal.SIGKILL:
            break
        hit.append((name, RunDir(out).state.get("step"), run.best is None))
        check_consistent(run)
        args = ["train", "--resume", "--out", str(out)]
    assert len(hit) >= 3, f"only {len(hit)} kills landed: {hit}"
    # (moment, step of the last checkpoint, checkpoints/best missing), e.g. [("start", 0, True),
    # ("best swap", 8, True), ("checkpoint write", 8, False), ("random", 12, False), ...]

    with open(root / "final.log", "wb") as log:
        assert macft(["train", "--resume", "--out", str(out)], log).wait(timeout=120) == 0
    assert run.state["status"] == "finished" and run.state["step"] == ITERS

    want, got = mx.load(str(ref.adapters_path)), mx.load(str(run.adapters_path))
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]), err_msg=f"{k} {hit}")
    ref_curve, run_curve = curve(ref), curve(run)
    assert sorted(run_curve) == list(range(ITERS + 1))  # every step once: nothing lost or repeated
    assert run_curve == ref_curve  # train and validation losses, bit for bit
    # best survived the kill in its swap window, and is the reference's
    assert json.loads((run.best / "state.json").read_text())["step"] == ref.state["best_step"]
    assert [p.name for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name] == []
