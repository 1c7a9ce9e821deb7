"""The run folder: atomic writes, refusing a used folder, checkpoints, metrics, locking."""

import json
import os
import shutil

import mlx.core as mx
import pytest
import yaml

from macft.errors import RunError
from macft.runs import folder as rd
from macft.runs.folder import RunDir

RECIPE = {"model": {"path": "tiny", "bits": 4}, "lora": {"rank": 8}, "train": {"iters": 10}}


def adapters(value=1.0):
    return {"model.layers.0.self_attn.q_proj.lora_a": mx.full((4, 2), value)}


def opt_state():
    return {"step": mx.array(3, dtype=mx.uint64), "m.x": mx.zeros((2,))}


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if ".tmp-" in p.name or p.name.startswith(".old-")]


def test_create_writes_recipe_and_state(tmp_path):
    run = RunDir(tmp_path / "runs" / "a")
    run.create(RECIPE, source={"kind": "hf"})
    assert yaml.safe_load(run.recipe_path.read_text()) == RECIPE
    assert run.state["status"] == "created"
    assert json.loads(run.base_path.read_text()) == {"kind": "hf"}


def test_refuses_a_folder_holding_a_run(tmp_path):
    RunDir(tmp_path / "a").create(RECIPE)
    with pytest.raises(RunError) as e:
        RunDir(tmp_path / "a").create(RECIPE)
    assert "--resume" in str(e.value) and "--out" in str(e.value)
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").create(RECIPE)  # an empty folder is fine


def test_open_needs_a_run(tmp_path):
    with pytest.raises(RunError, match="no run to resume"):
        RunDir(tmp_path / "nothing").open()
    RunDir(tmp_path / "a").create(RECIPE)
    assert RunDir(tmp_path / "a").open()["status"] == "created"


def test_resume_refuses_changed_lora_but_records_train_changes(tmp_path):
    RunDir(tmp_path / "a").create(RECIPE)
    changed = {**RECIPE, "lora": {"rank": 16}}
    with pytest.raises(RunError, match="lora.rank"):
        RunDir(tmp_path / "a").open_for_resume(changed)
    longer = {**RECIPE, "train": {"iters": 50}}
    RunDir(tmp_path / "a").open_for_resume(longer)
    assert RunDir(tmp_path / "a").recipe()["train"]["iters"] == 50


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    run.update_state(status="running", step=5)
    good = run.state_path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(rd.os, "fsync", broken_fsync)
    with pytest.raises(RunError, match="writing state.json failed: disk full"):
        run.update_state(status="running", step=6)
    assert run.state_path.read_bytes() == good
    assert leftovers(run.path) == []


def test_failed_adapter_save_keeps_the_previous_adapters(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    run.write_adapters(adapters(1.0), {"fine_tune_type": "lora"})

    def half_write(path, weights, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 10)  # a torn file
        raise RuntimeError("killed mid-write")

    with monkeypatch.context() as m, pytest.raises(RunError, match="killed mid-write"):
        m.setattr(rd.mx, "save_safetensors", half_write)
        run.write_adapters(adapters(2.0), {"fine_tune_type": "lora"})  # every failure says which
    loaded = mx.load(str(run.adapters_path))
    assert mx.array_equal(loaded["model.layers.0.self_attn.q_proj.lora_a"], adapters(1.0)[
        "model.layers.0.self_attn.q_proj.lora_a"
    ])  # fmt: skip
    assert leftovers(run.path) == []


def test_failed_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    run.save_checkpoint(5, adapters(), opt_state(), {"epoch": 0})

    def fail(path, obj):
        raise OSError("killed")

    with monkeypatch.context() as m, pytest.raises(RunError, match="checkpoint failed: killed"):
        m.setattr(rd, "atomic_write_json", fail)
        run.save_checkpoint(10, adapters(), opt_state(), {"epoch": 1})
    assert [p.name for p in run.list_checkpoints()] == ["step-000005"]
    assert not (run.checkpoints / "step-000010").exists()
    assert leftovers(run.path) == []


def test_checkpoint_round_trip(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    folder = run.save_checkpoint(7, adapters(3.0), opt_state(), {"epoch": 1, "index": 2}, {"x": 1})
    a, o, s = run.load_checkpoint(folder)
    assert mx.array_equal(a["model.layers.0.self_attn.q_proj.lora_a"], mx.full((4, 2), 3.0))
    assert o["step"].item() == 3 and o["step"].dtype == mx.uint64
    assert s == {"epoch": 1, "index": 2, "step": 7}
    assert json.loads((folder / "adapter_config.json").read_text()) == {"x": 1}
    # Saving the same step again replaces it whole.
    run.save_checkpoint(7, adapters(4.0), opt_state(), {"epoch": 9})
    assert run.load_checkpoint(folder)[2]["epoch"] == 9


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    run = RunDir(tmp_path / "a", keep_last=0)
    run.create(RECIPE)
    assert run.latest_checkpoint() is None
    for step in (100, 5, 20):
        run.save_checkpoint(step, adapters(), opt_state(), {})
    assert run.latest_checkpoint().name == "step-000100"
    run.save_checkpoint(1234567, adapters(), opt_state(), {})  # wider than the padding
    assert run.latest_checkpoint().name == "step-1234567"
    (run.checkpoints / "step-9999999").mkdir()  # no state.json: not a checkpoint
    (run.checkpoints / ".tmp-step-8888888-1").mkdir()
    assert run.latest_checkpoint().name == "step-1234567"


def test_keeps_the_last_k_checkpoints(tmp_path):
    run = RunDir(tmp_path / "a", keep_last=2)
    run.create(RECIPE)
    for step in (10, 20, 30, 40):
        run.save_checkpoint(step, adapters(), opt_state(), {})
    assert [p.name for p in run.list_checkpoints()] == ["step-000030", "step-000040"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000030", "step-000040"]


def test_best_is_kept_apart_from_pruning(tmp_path):
    run = RunDir(tmp_path / "a", keep_last=1)
    run.create(RECIPE)
    assert run.best is None
    run.save_best(adapters(1.0), {"fine_tune_type": "lora"}, {"step": 10, "val_loss": 1.5})
    run.save_best(adapters(2.0), {"fine_tune_type": "lora"}, {"step": 20, "val_loss": 1.2})
    for step in (10, 20, 30):
        run.save_checkpoint(step, adapters(), opt_state(), {})
    assert json.loads((run.best / "state.json").read_text())["step"] == 20
    assert (run.best / "adapter_config.json").exists()
    assert [p.name for p in run.list_checkpoints()] == ["step-000030"]


def test_metrics_append_read_and_trim(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    for step in (5, 10, 15):
        run.append_metrics({"step": step, "train_loss": 1.0 / step})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 20, "train_lo')  # a line torn by a hard crash
    assert [r["step"] for r in run.read_metrics()] == [5, 10, 15]
    run.trim_metrics(10)
    assert run.metrics_path.read_text().count("\n") == 2
    run.append_metrics({"step": 15, "train_loss": 0.5})
    assert [r["step"] for r in run.read_metrics()] == [5, 10, 15]


def test_lock_refuses_a_busy_run(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    with run.lock():
        with pytest.raises(RunError, match="busy"):
            with RunDir(tmp_path / "a").lock():
                pass
    with RunDir(tmp_path / "a").lock():
        pass


def test_lock_cleans_leftover_temp_files(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    (run.path / f".state.json.tmp-{os.getpid() + 1}").write_text("{")
    run.checkpoints.mkdir()
    (run.checkpoints / ".tmp-step-000010-1").mkdir()
    with run.lock():
        assert leftovers(run.path) == []


def test_lock_nests_in_one_run_dir_and_shows_from_outside(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    assert not RunDir(tmp_path / "a").is_locked()
    with run.lock():
        with run.lock():  # train.py holds it, the trainer takes it again
            assert RunDir(tmp_path / "a").is_locked()
        assert RunDir(tmp_path / "a").is_locked()  # still held by the outer one
        with pytest.raises(RunError, match="busy"):
            RunDir(tmp_path / "a").open_for_resume(RECIPE, write=False)
    assert not RunDir(tmp_path / "a").is_locked()


def test_a_folder_moved_aside_comes_back_when_its_swap_was_killed(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    run.save_best(adapters(1.0), None, {"step": 10})
    # killed between `best -> .old-best-PID` and `.tmp-best-PID -> best`
    os.replace(run.checkpoints / "best", run.checkpoints / ".old-best-4242")
    (run.checkpoints / ".tmp-best-4242").mkdir()
    with run.lock():
        assert json.loads((run.best / "state.json").read_text()) == {"step": 10}
        assert leftovers(run.path) == []
    # with the new folder in place, the old one is only a leftover
    shutil.copytree(run.best, run.checkpoints / ".old-best-4243")
    with run.lock():
        assert leftovers(run.path) == [] and run.best is not None


def test_metrics_lines_someone_broke_are_skipped_not_fatal(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    run.append_metrics({"step": 5})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": ' + "9" * 5000 + "}\n" + "[" * 5000 + "]" * 5000 + "\n[1, 2]\n")
    run.append_metrics({"step": 10})
    assert [r["step"] for r in run.read_metrics()] == [5, 10]


def test_append_after_a_torn_line_starts_a_new_one(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    run.append_metrics({"step": 5})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 10, "train_lo')  # killed mid-append
    run.append_metrics({"step": 10})
    assert [r["step"] for r in run.read_metrics()] == [5, 10]


def test_resume_check_writes_nothing_and_refuses_a_damaged_checkpoint(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    folder = run.save_checkpoint(5, adapters(), opt_state(), {})
    before = run.recipe_path.stat().st_mtime_ns
    RunDir(tmp_path / "a").open_for_resume({**RECIPE, "train": {"iters": 50}}, write=False)
    run.save_recipe(RECIPE)  # unchanged: not rewritten
    assert run.recipe_path.stat().st_mtime_ns == before
    (folder / "optimizer.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(RunError, match="step-000005: checkpoint unreadable.*delete it"):
        RunDir(tmp_path / "a").open_for_resume(RECIPE)


# --- a run folder never takes over the user's files ------------------------------------------
USERS = ["notes.tmp-1", ".draft.tmp-22", "report.txt"]


def users_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in USERS:
        (folder / name).write_text(name)
    (folder / ".old-photos-7").mkdir()  # looks like a folder macft moved aside, is not
    return folder


def test_lock_cleans_only_the_temp_names_macft_writes(tmp_path):
    run = RunDir(tmp_path / "a")
    run.create(RECIPE)
    users_files(run.path)
    (run.path / ".state.json.tmp-4242-0a1b2c3d").write_text("{")  # a killed write, new names
    run.checkpoints.mkdir()
    (run.checkpoints / ".tmp-step-000010-4242-0a1b2c3d").mkdir()
    (run.checkpoints / "mine.tmp-3").write_text("x")
    with run.lock():
        names = sorted(p.name for p in run.path.iterdir())
    assert set(USERS) | {".old-photos-7"} <= set(names) and "photos" not in names
    assert ".state.json.tmp-4242-0a1b2c3d" not in names
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["mine.tmp-3"]


@pytest.mark.parametrize("data", ["../train.jsonl", ".."])
def test_a_data_path_upwards_never_makes_the_working_folder_the_run(tmp_path, monkeypatch, data):
    from click.testing import CliRunner
    from helpers import save_tiny_model_dir, train_args, write_chat

    from macft.cli import cli

    model = save_tiny_model_dir(tmp_path / "tiny")
    write_chat(tmp_path / "train.jsonl", n=8)
    work = users_files(tmp_path / "work")
    monkeypatch.chdir(work)
    args = train_args(model, data, "x", "--set", "train.iters=1")
    args = args[: args.index("--out")] + args[args.index("--out") + 2 :]  # the default --out
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    runs = [p for p in (work / "runs").iterdir()]
    assert len(runs) == 1 and runs[0].name not in ("..", ".", "")
    assert RunDir(runs[0]).state["status"] == "finished"
    assert sorted(p.name for p in work.iterdir()) == sorted([*USERS, ".old-photos-7", "runs"])


@pytest.mark.parametrize("out", [".", "..", "notes"])
def test_a_new_run_refuses_the_working_folder_and_a_folder_of_other_files(tmp_path, monkeypatch,
                                                                          out):  # fmt: skip
    work = users_files(tmp_path / "work" / "here")
    users_files(work / "notes")
    monkeypatch.chdir(work)
    with pytest.raises(RunError, match="pick another --out|pick a new or empty folder") as e:
        RunDir(out).create(RECIPE)
    assert "\n" not in str(e.value)
    assert not (work / "recipe.yaml").exists() and not (work / "notes" / "recipe.yaml").exists()
