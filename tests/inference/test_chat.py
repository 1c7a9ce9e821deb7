"""macft chat on a tiny model trained through the CLI: one-shot prompts, errors, a real REPL in a pty."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import mlx.core as mx
import pexpect
import pytest
import yaml
from click.testing import CliRunner
from helpers import COLOUR, build_tiny_model, save_tiny_model_dir, train_with_cli, write_chat

from macft.cli import cli
from macft.config.schema import LoraConfig
from macft.inference.chat import ChatSession
from macft.lora.apply import apply_lora, lora_disabled
from macft.lora.layers import LoRALinear
from macft.runs.model import RunModel

QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("list interfaces on cisco ios?", "show ip interface brief"),
    ("save the config on cisco ios?", "copy running-config startup-config"),
    ("show routes in junos?", "show route"),
]
Q = QA[3][0]
PROMPT = r">>>(\x1b\[0m)? "  # the REPL's input prompt, coloured or not
GREEDY = ["--temp", "0", "--max-tokens", "12"]


def train(model_dir, data, out, *sets):
    settings = {
        "train.batch_size": 4,
        "train.grad_accumulation": 1,
        "train.grad_checkpoint": "false",
        "train.learning_rate": "1.0e-2",
        "train.warmup": 0,
        "train.eval_every": 3,
        "train.save_every": 3,
        "lora.rank": 4,
        "lora.dropout": 0.0,
        "data.system": "You are a network engineer.",
    }
    return train_with_cli(model_dir, data, out, settings, *sets)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained 6 steps: a run folder with adapters, checkpoints and a system prompt."""
    root = tmp_path_factory.mktemp("chat")
    model_dir = save_tiny_model_dir(root / "tiny")
    data = write_chat(root / "net.jsonl", 16, QA)
    return train(model_dir, data, root / "run", "train.iters=6")


def chat(*args, input=None):
    return CliRunner().invoke(cli, ["chat", *map(str, args)], input=input)


def assert_clean_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and len([x for x in lines if "Error" in x]) == 1
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


# --- the LoRA toggle ---------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_lora_disabled_is_the_base_and_restores(dora):
    model = build_tiny_model()
    x = mx.array([[5, 17, 42, 99]])
    base_out = model(x)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dora=dora, dropout=0.0))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape)
            if dora:
                m.m = m.m * 1.5
    tuned_out = model(x)
    assert not mx.allclose(tuned_out, base_out, atol=1e-3)
    with lora_disabled(model) as n:
        assert n == 2 * 7
        assert mx.allclose(model(x), base_out, atol=1e-5)
    assert mx.allclose(model(x), tuned_out)
    with pytest.raises(RuntimeError), lora_disabled(model):
        raise RuntimeError("boom")
    assert mx.allclose(model(x), tuned_out)  # restored after an error too


def test_save_leaves_out_blank_answers(tmp_path):
    session = ChatSession(RunModel(None, None, "tiny", adapters=tmp_path / "a"), system="Be brief.")
    session.tuned.messages = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "  "},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": " B \n"},
    ]
    assert session.save(str(tmp_path / "c.jsonl")) == (1, 1)
    line = json.loads((tmp_path / "c.jsonl").read_text())
    assert [m["content"] for m in line["messages"]] == ["Be brief.", "b?", "B"]


def test_save_rewrites_the_file_whole_and_ends_a_torn_line(tmp_path):
    session = ChatSession(RunModel(None, None, "tiny", adapters=tmp_path / "a"))
    session.tuned.messages = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "A"},
    ]
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "kept"}\n{"text": "no newline"}')
    assert session.save(str(f)) == (1, 0)
    lines = f.read_text().splitlines()
    assert lines[:2] == ['{"text": "kept"}', '{"text": "no newline"}']
    assert json.loads(lines[2])["messages"][1]["content"] == "A"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no temp file left


# --- one-shot answers --------------------------------------------------------------------


def test_prompt_answers_once_and_is_reproducible(run):
    first = chat(run, "--prompt", Q, *GREEDY)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip()  # the answer, alone on stdout
    assert "tokens/s" in first.stderr and "peak memory" in first.stderr
    assert "adapters" in first.stderr and "system prompt: You are a network engineer." in (
        first.stderr
    )
    assert chat(run, "--prompt", Q, *GREEDY).stdout == first.stdout
    sampled = ["--prompt", Q, "--temp", "1.0", "--seed", "3", "--max-tokens", "12"]
    assert chat(run, *sampled).stdout == chat(run, *sampled).stdout


def test_compare_prompt_shows_base_and_fine_tune(run):
    result = chat(run, "--compare", "--prompt", Q, *GREEDY)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.index("── base ──") < out.index("── fine-tune ──")
    assert result.stderr.count("tokens/s") == 2


def test_piped_stdin_is_one_prompt_per_line(run):
    result = chat(run, *GREEDY, input=f"{Q}\n\n{QA[0][0]}\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("tokens/s") == 2
    whole = chat(run, "--prompt", "-", *GREEDY, input=f"{Q}\n{QA[0][0]}\n")
    assert whole.exit_code == 0 and whole.stderr.count("tokens/s") == 1


def test_plain_model_and_checkpoints(run, tmp_path):
    base = chat("--model", run.parent / "tiny", "--prompt", Q, *GREEDY)
    assert base.exit_code == 0 and "adapters" not in base.stderr
    best = chat(run, "--checkpoint", "best", "--prompt", Q, *GREEDY)
    assert best.exit_code == 0 and "checkpoints/best/adapters.safetensors" in best.stderr
    step = chat(run, "--checkpoint", "3", "--prompt", Q, *GREEDY)
    assert step.exit_code == 0 and "step-000003" in step.stderr
    assert_clean_error(chat(run, "--checkpoint", "step-4", "-p", Q), "step-000003", "best")
    # an unfinished run (no final adapters yet): the latest checkpoint, and macft says so
    copy = shutil.copytree(run, tmp_path / "unfinished")
    (copy / "adapters.safetensors").unlink()
    result = chat(copy, "--prompt", Q, *GREEDY)
    assert result.exit_code == 0 and "using step-000006" in result.stderr


# --- errors ------------------------------------------------------------------------------


def test_missing_run_folder(run, tmp_path):
    result = chat(run.parent / "runn", "-p", Q)
    assert_clean_error(result, "does not exist", "run/", "macft train")
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    assert_clean_error(chat(empty, "-p", Q), "holds no run", "notes/", "macft train")
    assert_clean_error(chat("-p", Q), "macft chat runs/NAME")
    assert_clean_error(chat("--model", run.parent / "tiny", "--compare", "-p", Q), "--compare")


def test_run_whose_base_moved(run, tmp_path):
    moved = shutil.copytree(run, tmp_path / "moved")
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["model"]["path"] = str(tmp_path / "gone")
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = chat(moved, "-p", Q)
    assert_clean_error(result, "recipe.yaml", f"model.path {tmp_path / 'gone'}", "--model")
    fixed = chat(moved, "--model", run.parent / "tiny", "-p", Q, *GREEDY)
    assert fixed.exit_code == 0, fixed.output


def test_adapter_folder_without_recipe_needs_model(run, tmp_path):
    bare = tmp_path / "adapters"
    bare.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):  # what mlx-lm's lora writes
        shutil.copy(run / name, bare / name)
    assert_clean_error(chat(bare, "-p", Q), "no recipe.yaml", "--model PATH")
    result = chat(bare, "--model", run.parent / "tiny", "--prompt", Q, *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == chat(run, "--system", "", "--prompt", Q, *GREEDY).stdout


def test_adapters_that_do_not_fit_the_base(run, tmp_path):
    other = save_tiny_model_dir(tmp_path / "wider", hidden_size=96)
    result = chat(run, "--model", other, "-p", Q)
    assert_clean_error(result, str(run / "adapters.safetensors"), str(other), "does not fit")


# --- the REPL, driven in a pseudo-terminal -----------------------------------------------


def spawn(*args, env=None):
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "macft", "chat", *map(str, args)],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    child.expect(PROMPT)
    return child


def send(child, line: str) -> str:
    """Type a line, wait for the next prompt, return what was printed (without the echo)."""
    child.sendline(line)
    child.expect(PROMPT)
    return child.before.replace("\r\n", "\n").split("\n", 1)[-1]


def test_repl_commands_history_compare_and_save(run, tmp_path):
    first_answer = chat(run, "--prompt", Q, *GREEDY).stdout.strip()
    assert first_answer
    child = spawn(run, *GREEDY)
    assert "/compare" in send(child, "/help")
    assert first_answer in send(child, Q)
    second = send(child, QA[0][0])
    assert "tokens/s" in second and "peak memory" in second
    # the second turn's prompt is the whole conversation through the chat template
    prompt = send(child, "/prompt")
    assert prompt.index("You are a network engineer.") < prompt.index(Q)
    # a tiny model's answer may be a few characters that occur earlier too: look after Q
    answer_at = prompt.index(first_answer, prompt.index(Q) + len(Q))
    assert answer_at < prompt.index(QA[0][0])
    assert re.search(r"user: show bgp summary in junos\?", send(child, "/history"))
    assert "temperature 0" in send(child, "/temp 0")
    assert "Error: /temp takes a number" in send(child, "/temp hot")
    assert "unknown command /nope" in send(child, "/nope")
    assert "compare on" in send(child, "/compare on")
    both = send(child, QA[2][0])
    assert both.index("── base ──") < both.index("── fine-tune ──")
    assert both.count("tokens/s") == 2
    (tmp_path / "afile").write_text("")
    assert "Error: cannot write" in send(child, f"/save {tmp_path / 'afile' / 'x.jsonl'}")
    saved = tmp_path / "chats.jsonl"
    # A tiny random model may answer a turn with nothing (its first token an end of turn, as
    # one CPU's rounding has it): /save leaves such a turn out and says so.
    said = re.search(r"saved (\d) exchanges.*?(?:\((\d) empty answers left out\))?\n",
                     send(child, f"/save {saved}"))  # fmt: skip
    n = int(said[1])
    assert n >= 2 and n + int(said[2] or 0) == 3, said[0]
    assert "new conversation" in send(child, "/reset")
    assert "user:" not in send(child, "/history")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    line = json.loads(saved.read_text())
    roles = [m["role"] for m in line["messages"]]
    assert roles == ["system"] + ["user", "assistant"] * n
    assert line["messages"][2]["content"] == first_answer
    # macft train accepts what /save wrote
    train(run.parent / "tiny", saved, tmp_path / "again", "train.iters=1", "train.eval_every=0")
    assert (tmp_path / "again" / "adapters.safetensors").is_file()


@pytest.mark.once
def test_ctrl_c_stops_an_answer_not_the_session(run):
    # Started with SIGINT ignored, as when the parent was inside system() (MLX building a
    # kernel on another thread) at the fork: the REPL must take Ctrl-C back.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = spawn(run, "--temp", "0", "--max-tokens", "100000")
    finally:
        signal.signal(signal.SIGINT, old)
    child.sendline(Q)
    child.expect(r"\n")  # the echo of the question
    child.expect(r"\S")  # the first token of the answer
    child.sendintr()
    # A Ctrl-C that lands while MLX builds a kernel is lost (system() ignores SIGINT for that
    # moment); a user presses it again, and so does this.
    if child.expect(["stopped", pexpect.TIMEOUT], timeout=15) == 1:
        child.sendintr()
        child.expect("stopped")
    child.expect(PROMPT)
    assert "user:" not in send(child, "/history")  # the stopped exchange is not kept
    assert "system prompt: none" in send(child, "/system none").lower().replace("(", "")
    child.sendintr()  # Ctrl-C at the prompt leaves cleanly
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.once
def test_no_color_leaves_the_prompt_and_every_line_plain_in_a_terminal(run):
    colours = {"TERM": "xterm-256color", "NO_COLOR": ""}  # a terminal that shows colours
    child = spawn(run, *GREEDY, env=colours)
    assert "\x1b[" in child.after  # the coloured prompt
    child.close()
    for no_color in ({"NO_COLOR": "1"}, {}):
        child = spawn(
            run, *GREEDY, *([] if no_color else ["--no-color"]), env={**colours, **no_color}
        )
        assert child.after == ">>> " and not COLOUR.search(child.before)
        answer = send(child, Q)
        assert "tokens/s" in answer and not COLOUR.search(answer)
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()


@pytest.mark.once
def test_script_lines_are_whole_on_stderr(run):
    """Piped, the loading line holds the whole adapters path, however long."""
    result = chat(run, "--prompt", Q, *GREEDY)
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith("macft chat ") and f"adapters {run}/adapters.safetensors " in first
    assert "   backend: " in first


@pytest.mark.once
def test_ctrl_d_leaves_cleanly(run):
    child = spawn(run)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# --- the real SmolLM2 ---------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.path("cpu")  # the Mac's path on the real model: tests/cli/test_mac_path_e2e.py
def test_real_fine_tune_changes_the_answer(smollm2_gguf, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    run = train(
        "smollm2-135m",
        data,
        tmp_path / "run",
        "train.iters=6",
        "train.learning_rate=5.0e-3",  # high, so that 6 steps clearly change the answers
        "data.valid_fraction=0.0",
        "train.eval_every=0",
        "train.save_every=0",
        "lora.rank=8",
        "lora.layers=8",  # the last 8 of 30: a shorter backward pass
    )
    result = chat(run, "--compare", "--prompt", QA[0][0], "--temp", "0", "--max-tokens", "16")
    assert result.exit_code == 0, result.output
    base, tuned = result.stdout.split("── fine-tune ──")
    base = base.split("── base ──")[1].strip()
    assert base and tuned.strip() and base != tuned.strip(), result.stdout


@pytest.mark.once
def test_input_that_is_not_utf8_is_answered_not_a_traceback(run):
    """A terminal or a pipe in another encoding: the bytes that are not UTF-8 arrive as lone
    surrogates, which the tokenizer refused with a traceback."""
    env = {**os.environ, "MACFT_NO_OPENBLAS": "1"}
    for args, data in (
        (["--prompt", "-"], b"caf\xe9 in junos?\n"),  # Latin-1
        ([], b"show \xff routes?\nsecond question\n"),  # one prompt per line
        (["--prompt", "a\udcff b", "--system", "you are \udce9"], b""),  # arguments too
    ):
        argv = [sys.executable, "-m", "macft", "chat", str(run), *args, *GREEDY]
        out = subprocess.run(argv, input=data, capture_output=True, env=env, timeout=120)
        err = out.stderr.decode(errors="replace")
        assert out.returncode == 0 and "Traceback" not in err, err[-2000:]
