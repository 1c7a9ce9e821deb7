"""The train command driven through the CLI on a tiny model: run folder, metrics, errors."""

import json

import mlx_lm
import pytest
import yaml
from click.testing import CliRunner
from helpers import train_args, write_chat

from macft.cli import cli


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_complete_run_folder(tiny_model_dir, tmp_path):
    data = write_chat(tmp_path / "net.jsonl")
    out = tmp_path / "runs" / "net"
    args = train_args(tiny_model_dir, data, out, "--set", "train.iters=12")
    result = CliRunner().invoke(cli, args + ["--set", "train.eval_every=6"])
    assert result.exit_code == 0, result.output
    for name in ("recipe.yaml", "adapters.safetensors", "adapter_config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert any((out / "checkpoints").iterdir())
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["train"]["iters"] == 12 and saved["lora"]["rank"] == 4
    rows = read_metrics(out)
    for key in ("step", "train_loss", "learning_rate", "tokens_per_s", "peak_memory_gb"):
        assert key in rows[0]
    assert any("val_loss" in r for r in rows)
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    assert losses[-1] < losses[0]
    # mlx-lm reads macft's adapters straight from the run folder
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(out))
    assert model is not None


def test_existing_run_is_not_overwritten(tiny_model_dir, tmp_path):
    data = write_chat(tmp_path / "net.jsonl")
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, data, out, "--set", "train.iters=2")
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = (out / "adapters.safetensors").read_bytes()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "--resume" in result.output and "Traceback" not in result.output
    assert (out / "adapters.safetensors").read_bytes() == before


def test_resume_continues_to_more_steps(tiny_model_dir, tmp_path):
    data = write_chat(tmp_path / "net.jsonl")
    out = tmp_path / "run"
    first = CliRunner().invoke(cli, train_args(tiny_model_dir, data, out, "--set", "train.iters=4"))
    assert first.exit_code == 0, first.output
    result = CliRunner().invoke(
        cli, ["train", "--resume", "--out", str(out), "--set", "train.iters=8"]
    )
    assert result.exit_code == 0, result.output
    assert read_metrics(out)[-1]["step"] == 8


@pytest.mark.once
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "lora.rnak=4"], "lora.rnak: unknown key; did you mean lora.rank?"),
        (["--set", "lora.targets=[q_prj]"], "q_proj"),
        (["--set", "train.iters=0"], "train.iters: must be >= 1"),
        (["--set", "train.dpo_nll=-1"], "train.dpo_nll: must be >= 0, got -1"),
    ],
)
def test_bad_input_is_one_clean_line(tiny_model_dir, tmp_path, extra, needle):
    data = write_chat(tmp_path / "net.jsonl")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, train_args(tiny_model_dir, data, out, *extra))
    assert result.exit_code == 1
    assert needle in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert not (out / "adapters.safetensors").exists()


def test_bad_data_line_names_file_and_line(tiny_model_dir, tmp_path):
    data = write_chat(tmp_path / "net.jsonl", n=4)
    with data.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}\n')
    result = CliRunner().invoke(cli, train_args(tiny_model_dir, data, tmp_path / "run"))
    assert result.exit_code == 1
    assert f"{data}:5" in result.output and "Traceback" not in result.output


@pytest.mark.once
def test_missing_model_and_data(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--model", str(tmp_path / "nope"), "--data", "x"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["train", "--data", "x.jsonl"])
    assert "model.path: missing; pass --model PATH" in result.output


def test_only_commands_that_compute_set_up_the_process(monkeypatch, tmp_path):
    """OpenBLAS's restart and the kernel wrapper are for train, chat, serve, eval and fuse alone."""
    import sys

    from macft import cli as cli_package
    from macft.cpu import process

    computing = {name for name, c in cli.commands.items() if getattr(c, "computes", False)}
    assert computing == {"train", "chat", "serve", "eval", "fuse"}
    calls = []
    monkeypatch.setattr(process, "prepare", lambda: calls.append(sys.argv[1]))
    for argv, prepared in ((["runs", "--json", str(tmp_path)], []), (["--version"], [])):
        monkeypatch.setattr(sys, "argv", ["macft", *argv])
        with pytest.raises(SystemExit):
            cli_package.main()
        assert calls == prepared
    monkeypatch.setattr(sys, "argv", ["macft", "train", "--help"])
    with pytest.raises(SystemExit):
        cli_package.main()
    assert calls == ["train"]


@pytest.mark.once
def test_out_in_a_recipe_expands_the_home_folder(tiny_model_dir, tmp_path, monkeypatch):
    data = write_chat(tmp_path / "net.jsonl", n=8)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_model_dir), "compute": "float32"},
                "data": {"path": str(data)},
                "lora": {"rank": 4},
                "train": {"iters": 1, "batch_size": 2},
                "out": "~/runs/net",
            }
        )  # fmt: skip
    )
    result = CliRunner().invoke(cli, ["train", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "runs" / "net" / "adapters.safetensors").is_file()
    assert not (tmp_path / "~").exists()


@pytest.mark.once
def test_paths_are_printed_as_text_not_markup(tiny_model_dir, tmp_path, monkeypatch):
    """rich reads "[...]" as markup: "[/]" in a path raised, "data[v2]" showed as "data"."""
    data = write_chat(tmp_path / "data[v2].jsonl", n=8)
    out = tmp_path / "runs" / "a[/]b"
    result = CliRunner().invoke(
        cli, train_args(tiny_model_dir, data, out, "--set", "train.iters=1")
    )
    assert result.exit_code == 0, result.output
    flat = result.output.replace("\n", "")  # lines wrap at 80 columns here
    assert f"-> {out}" in flat and f"{out}/adapters.safetensors" in flat
    monkeypatch.chdir(tmp_path)  # short paths: the table has 80 columns here
    listed = CliRunner().invoke(cli, ["runs", "runs"])
    assert listed.exit_code == 0 and "runs/a[/]b" in listed.output, listed.output
    export = tmp_path / "ex[port]"
    fused = CliRunner().invoke(cli, ["fuse", str(out), "--out", str(export)])
    assert fused.exit_code == 0, fused.output
    assert f"macft fuse {out} -> {export}" in fused.output.replace("\n", "")
    for args in (["chat", str(out), "--prompt", "hi", "--max-tokens", "2"],
                 ["eval", str(out), "--data", str(data)]):  # fmt: skip
        other = CliRunner().invoke(cli, args)
        assert other.exit_code == 0, (args, other.output)
