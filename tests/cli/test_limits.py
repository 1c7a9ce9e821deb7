"""Disk and memory limits: refuse before a write the disk cannot hold (the run stays resumable),
and before a training plan beyond Metal's working set."""

from collections import namedtuple

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import train_args, write_chat
from rich.console import Console

from macft import atomic, device
from macft.cli import cli
from macft.config.recipes import load_recipe
from macft.errors import MacftError, RunError
from macft.runs.folder import RunDir
from macft.train import plan as planning

Usage = namedtuple("Usage", "total used free")
MB = 1 << 20


def adapters(n=1000):
    return {"model.layers.0.self_attn.q_proj.lora_a": mx.ones((n, 4))}


def test_checkpoint_refused_before_writing_when_disk_is_short(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.create({"train": {}})
    run.save_checkpoint(1, adapters(), adapters(), {})
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: Usage(10 * MB, 0, MB // 2))
    with pytest.raises(RunError) as e:
        run.save_checkpoint(2, adapters(), adapters(), {})
    msg = str(e.value)
    # 2 x 16,000 bytes of tensors, +5%, + the 1 MiB margin (1.08 MB); the run folder's mount
    assert f"need 1.1 MB free on {atomic.mount_point(run.path)}" in msg
    assert "have 524.3 KB" in msg and f"macft train --resume --out {run.path}" in msg
    assert "\n" not in msg
    assert [p.name for p in run.checkpoints.iterdir()] == ["step-000001"]
    with pytest.raises(RunError, match="for adapters.safetensors"):
        run.write_adapters(adapters(), None)
    assert not run.adapters_path.exists()


def test_the_estimate_covers_what_is_written(tmp_path):
    run = RunDir(tmp_path / "run")
    big = adapters(20_000)
    folder = run.save_checkpoint(1, big, big, {"epoch": 0})
    written = sum(p.stat().st_size for p in folder.iterdir())
    estimate = atomic.tensor_bytes(big, big)
    assert written - 4096 <= estimate <= written * 1.05  # state.json is the 4 KB slack


def test_mount_point_of_a_missing_path_is_its_file_system(tmp_path):
    assert atomic.mount_point(tmp_path / "not" / "yet") == atomic.mount_point(tmp_path)


@pytest.mark.parametrize("refuse_at", [3, 4, 5])
def test_full_disk_mid_run_fails_cleanly_and_resumes_exactly(tmp_path, monkeypatch, refuse_at):
    """Saves of a 6-step run, save_every=2: checkpoints 2 and 4, best at 6, checkpoint 6,
    adapters.safetensors. The disk fills before save number `refuse_at`."""
    model = tmp_path / "tiny"
    from helpers import save_tiny_model_dir

    save_tiny_model_dir(model)
    data = write_chat(tmp_path / "net.jsonl", n=12)
    sets = ["--set", "train.iters=6", "--set", "train.save_every=2", "--set", "train.eval_every=0"]
    ref = CliRunner().invoke(cli, train_args(model, data, tmp_path / "ref", *sets))
    assert ref.exit_code == 0, ref.output

    calls, real = [], atomic.shutil.disk_usage

    def filling(path):
        calls.append(path)
        free = MB if len(calls) >= refuse_at else 1 << 40
        return Usage(1 << 41, 0, free)

    out = tmp_path / "run"
    monkeypatch.setattr(atomic.shutil, "disk_usage", filling)
    result = CliRunner().invoke(cli, train_args(model, data, out, *sets))
    assert result.exit_code == 1
    last = result.output.rstrip().splitlines()[-1]
    assert last.startswith(f"Error: {out}: need ") and "MB free on" in last
    assert f"then continue with: macft train --resume --out {out}" in last
    run = RunDir(out)
    assert run.state["status"] == "failed" and "need" in run.state["error"]
    kept = ["step-000002", "step-000004"] + (["step-000006"] if refuse_at == 5 else [])
    assert [p.name for p in run.list_checkpoints()] == kept
    assert not run.adapters_path.exists()

    monkeypatch.setattr(atomic.shutil, "disk_usage", real)
    again = CliRunner().invoke(cli, ["train", "--resume", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert run.state["status"] == "finished"
    want, got = (
        mx.load(str(tmp_path / "ref" / "adapters.safetensors")),
        mx.load(str(run.adapters_path)),
    )
    for k in want:
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]))


# --- memory ----------------------------------------------------------------------------------
def tiny_plan_inputs():
    from helpers import TINY_CONFIG

    recipe, _ = load_recipe(
        None,
        ("lora.rank=4", "train.batch_size=4", "train.grad_accumulation=1"),
        {"model.path": "tiny", "data.path": "d.jsonl"},
    )
    recipe["train"]["grad_checkpoint"] = False
    return recipe, dict(TINY_CONFIG), {"compute": "quantized"}, [60] * 8


def usable(monkeypatch, metal: bool, nbytes: int):
    monkeypatch.setattr(device, "metal_available", lambda: metal)
    monkeypatch.setattr(device, "usable_memory_bytes", lambda: nbytes)


def plan_total(monkeypatch) -> int:
    usable(monkeypatch, True, 1 << 40)
    return planning.check_before_training(*tiny_plan_inputs(), Console(quiet=True), False).total


def test_metal_refuses_a_plan_beyond_the_working_set(monkeypatch):
    total = plan_total(monkeypatch)
    usable(monkeypatch, True, total - 1_000_000)  # batch 1 x 4 accumulated fits, batch 4 not
    with pytest.raises(MacftError) as e:
        planning.check_before_training(*tiny_plan_inputs(), Console(quiet=True), False)
    msg = str(e.value)
    assert "Metal's working set" in msg and "it would swap" in msg
    assert "--set train.batch_size=1 --set train.grad_accumulation=4" in msg and "--force" in msg


@pytest.mark.path("cpu")
def test_force_and_cpu_only_warn(monkeypatch):
    total = plan_total(monkeypatch)
    for metal, force in ((True, True), (False, False)):
        usable(monkeypatch, metal, total - 1_000_000)
        console = Console(record=True, width=200)
        plan = planning.check_before_training(*tiny_plan_inputs(), console, force)
        assert not plan.fits
        assert "warning: the plan exceeds usable memory" in console.export_text()


def test_train_on_metal_refuses_a_plan_that_cannot_fit(tmp_path, monkeypatch):
    from helpers import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "tiny")
    data = write_chat(tmp_path / "net.jsonl", n=8)
    monkeypatch.setattr(device, "set_wired_limit", lambda: None)  # no Metal here to wire
    usable(monkeypatch, True, 1000)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, train_args(model, data, out, "--set", "train.iters=2"))
    assert result.exit_code == 1
    last = result.output.rstrip().splitlines()[-1]
    assert last.startswith("Error: ") and "Traceback" not in result.output
    assert "leave no room in" in last and "pick a smaller model" in last
    assert not out.exists()


# --- real failures: a disk that fills, a file-size limit -----------------------------------
@pytest.mark.parametrize("when", ["start", "step 3"])
def test_a_disk_that_really_fills_fails_cleanly_and_resumes_exactly(tmp_path, monkeypatch, when):
    """A real tmpfs filled to the last page: before the first metrics line (which then fails
    with ENOSPC), or after step 3 (step 4's checkpoint is refused, and state.json itself
    cannot be written: the space kept aside while training makes room for it)."""
    from helpers import fill_disk, save_tiny_model_dir, small_disk

    from macft.train import session

    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_chat(tmp_path / "d.jsonl", n=12)
    sets = ["--set", "train.iters=6", "--set", "train.save_every=2", "--set", "train.eval_every=0",
            "--set", "train.report_every=1"]  # fmt: skip
    ref = CliRunner().invoke(cli, train_args(model, data, tmp_path / "ref", *sets))
    assert ref.exit_code == 0, ref.output
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "run"

        class FillsTheDisk(session.TrainProgress):
            def on_start(self, total_steps, start_step=0):
                super().on_start(total_steps, start_step)
                if when == "start":
                    fill_disk(disk)

            def on_report(self, report):
                super().on_report(report)
                if when == "step 3" and report["step"] == 3:
                    fill_disk(disk)

        with monkeypatch.context() as m:  # undo() would also undo conftest's path setting
            m.setattr(session, "TrainProgress", FillsTheDisk)
            result = CliRunner().invoke(cli, train_args(model, data, out, *sets))
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        last = result.output.rstrip().splitlines()[-1]
        if when == "start":
            assert last.startswith(f"Error: {out}: writing metrics.jsonl failed: the disk is full")
        else:
            assert last.startswith(f"Error: {out}: need ") and f"MB free on {disk} for" in last
        assert f"continue with: macft train --resume --out {out}" in last
        run = RunDir(out)
        assert run.state["status"] == "failed", run.state
        kept = [] if when == "start" else ["step-000002"]
        assert [p.name for p in run.list_checkpoints()] == kept
        (disk / "filler").unlink()
        again = CliRunner().invoke(cli, ["train", "--resume", "--out", str(out)])
        assert again.exit_code == 0, again.output
        want = mx.load(str(tmp_path / "ref" / "adapters.safetensors"))
        got = mx.load(str(run.adapters_path))
        for k in want:
            np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]))


def test_a_file_size_limit_fails_a_checkpoint_cleanly(tmp_path):
    """RLIMIT_FSIZE: the 1 MB optimizer state of a rank-64 checkpoint cannot be written (EFBIG),
    the 0.5 MB adapters and every small file can."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    from helpers import save_tiny_model_dir

    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_chat(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "run"
    args = train_args(model, data, out, "--set", "train.iters=4", "--set", "train.save_every=2",
                      "--set", "lora.rank=64", "--set", "train.compile=false")  # fmt: skip

    def limit():  # in the child: writes past 768 KB fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (768 << 10, resource.RLIM_INFINITY))

    env = {**os.environ, "MACFT_NO_OPENBLAS": "1", "MACFT_NO_NATIVE_KERNELS": "1"}
    child = subprocess.run([sys.executable, "-m", "macft", *args], env=env, preexec_fn=limit,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    output = child.stdout + child.stderr
    assert child.returncode == 1 and "Traceback" not in output, output
    last = output.rstrip().splitlines()[-1]
    assert last.startswith(f"Error: {out}: writing a checkpoint failed: a file grew past"), last
    assert "(ulimit -f)" in last and f"macft train --resume --out {out}" in last
    run = RunDir(out)
    assert run.state["status"] == "failed" and run.list_checkpoints() == []
    assert [p.name for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name] == []
    again = CliRunner().invoke(cli, ["train", "--resume", "--out", str(out)])
    assert again.exit_code == 0 and run.state["status"] == "finished", again.output
