"""Crash-safe writes: temp files never written through a planted link, flushed to the drive
itself on macOS (F_FULLFSYNC), JSON strict."""

import fcntl
import json
import os

import pytest

from macft import atomic
from macft.runs.folder import RunDir


def test_a_link_planted_under_a_predictable_temp_name_is_never_written_through(tmp_path):
    """In a shared folder another user can guess `.state.json.tmp-PID` and leave a link there
    to a file of yours: the write must not land in that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = RunDir(tmp_path / "run")
    run.create({"model": {"path": "m"}})
    pid = os.getpid()
    for name in ("state.json", "adapters.safetensors"):
        for suffix in ("", ".safetensors"):
            (run.path / f".{name}.tmp-{pid}{suffix}").symlink_to(victim)
    run.update_state(status="running", step=3)
    atomic.atomic_write_bytes(run.path / "adapters.safetensors", b"new")
    assert victim.read_text() == "keep me"
    assert json.loads(run.state_path.read_text())["step"] == 3
    assert (
        not run.state_path.is_symlink()
        and (run.path / "adapters.safetensors").read_bytes() == b"new"
    )


def test_temp_files_are_created_new_never_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(FileExistsError):
        os.close(atomic.create_exclusive(tmp_path / "link"))
    assert victim.read_text() == "keep me"
    names = {atomic.temp_name(tmp_path / "a.json").name for _ in range(50)}
    assert len(names) == 50 and all(atomic.TEMP_RE.match(n)["name"] == "a.json" for n in names)


def test_macos_full_fsync_is_asked_for_where_the_platform_has_it(tmp_path, monkeypatch):
    """fsync on macOS leaves the data in the drive's cache; F_FULLFSYNC flushes it."""
    calls, real_fcntl = [], fcntl.fcntl
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)  # macOS's value

    def fake_fcntl(fd, cmd, *args):
        if cmd == 51:
            calls.append(os.path.realpath(f"/proc/self/fd/{fd}"))
            return 0
        return real_fcntl(fd, cmd, *args)

    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("plain fsync where F_FULLFSYNC works"))
    atomic.atomic_write_json(tmp_path / "state.json", {"step": 1})
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 1}
    assert any(".state.json.tmp-" in c for c in calls)  # the file, before its rename
    assert str(tmp_path) in calls  # and the folder, after


def test_json_is_strict_nan_and_infinity_become_null(tmp_path):
    atomic.atomic_write_json(tmp_path / "s.json", {"a": float("nan"), "b": [float("-inf"), 1.5]})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}
