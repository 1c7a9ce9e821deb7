"""macft starts Python again (the OpenBLAS restart, mlx.launch, each --hosts rank) without the
working folder on sys.path: a click.py, yaml.py or mlx/ lying there never runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ROOT

from macft.cli import cli
from macft.cpu import blas
from macft.train.parallel import hosts
from macft.train.parallel.world import TIMEOUT_ENV

HOSTILE = ("click", "yaml", "mlx", "rich", "numpy")


def hostile_folder(folder: Path) -> Path:
    """A working folder whose modules shadow macft's dependencies and leave a mark if imported."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in HOSTILE:
        code = f"open({str(folder / ('IMPORTED-' + name))!r}, 'w').close()\nraise ImportError\n"
        if name == "mlx":
            (folder / "mlx").mkdir(exist_ok=True)
            (folder / "mlx" / "__init__.py").write_text(code)
        else:
            (folder / f"{name}.py").write_text(code)
    return folder


def marks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("IMPORTED-*"))


def clean_env(**extra) -> dict:
    """The environment of a user's shell: no OpenBLAS preloaded yet, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.NO_FAST_BLAS_ENV)}
    path = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path), **extra}


def test_python_code_never_imports_from_the_working_folder(tmp_path):
    from macft.relaunch import macft_command, python_code

    cwd = hostile_folder(tmp_path / "cwd")
    out = subprocess.run(
        python_code("import click, yaml, mlx.core; print(click.__file__)"),
        cwd=cwd, env=clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert marks(cwd) == [] and str(cwd) not in out.stdout
    version = subprocess.run(macft_command("--version"), cwd=cwd, env=clean_env(),
                             capture_output=True, text=True)  # fmt: skip
    assert version.returncode == 0 and "macft" in version.stdout, version.stderr
    assert marks(cwd) == []


@pytest.mark.skipif(blas.openblas_path() is None, reason="no OpenBLAS here: macft never restarts")
def test_the_openblas_restart_does_not_import_from_the_working_folder(tmp_path):
    script = shutil.which("macft", path=str(Path(sys.executable).parent))
    assert script, "the macft script of this environment"
    cwd = hostile_folder(tmp_path / "cwd")
    # train restarts itself with OpenBLAS preloaded before it parses anything
    out = subprocess.run([script, "train", "--help"], cwd=cwd, env=clean_env(),
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Recipe keys" in out.stdout and marks(cwd) == []


def test_hosts_start_mlx_launch_and_ranks_safely_and_pass_the_peer_timeout(monkeypatch):
    seen = []
    monkeypatch.setattr(hosts, "_run", lambda cmd: seen.append(cmd) or [])
    monkeypatch.setenv(TIMEOUT_ENV, "42")
    hosts.launch(["train", "--recipe", "r.yaml"], "127.0.0.1,127.0.0.1", None)
    cmd = seen[0]
    rank = cmd[cmd.index("--") + 1 :]
    assert rank[:2] == [sys.executable, "-c"] and rank[-3:] == ["train", "--recipe", "r.yaml"]
    assert cmd[:2] == [sys.executable, "-c"] and "-m" not in cmd
    assert "sys.path" in cmd[2] and "sys.path" in rank[2]  # each drops the working folder
    # ssh to another Mac drops this shell's variables: mlx.launch sets it on every rank
    assert cmd[cmd.index("--env") + 1] == f"{TIMEOUT_ENV}=42"


def test_ranks_started_by_hosts_never_import_from_the_working_folder(tmp_path, monkeypatch):
    cwd = hostile_folder(tmp_path / "cwd")
    monkeypatch.chdir(cwd)
    for k, v in clean_env(MACFT_NO_OPENBLAS="1", MACFT_PEER_TIMEOUT="20").items():
        monkeypatch.setenv(k, v)
    # both ranks start, import everything, and stop at the missing data file
    args = ["train", "--model", "m", "--data", "missing.jsonl", "--hosts", "127.0.0.1,127.0.0.1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "rank 0 stopped" in result.output or "rank 1 stopped" in result.output
    assert marks(cwd) == []
