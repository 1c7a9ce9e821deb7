"""macft eval and macft report on a tiny model: every metric against hand-computed values."""

import json
import math
import os
import shutil
import subprocess

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    assert_documented_keys,
    build_tiny_hf_tokenizer,
    save_tiny_model_dir,
    short_general_text,
)
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from macft.cli import cli
from macft.data.encode import Example
from macft.data.heldout import GENERAL_TEXT, load_eval_data, loss_examples, make_case, make_cases
from macft.errors import DataError
from macft.inference.scoring import (
    contains,
    exact_match,
    forgetting,
    normalise,
    overfitting,
    perplexity,
    token_f1,
)
from macft.models import load_base
from macft.runs.model import load_run_model
from macft.train.evaluate import evaluate

QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("list interfaces on cisco ios?", "show ip interface brief"),
    ("save the config on cisco ios?", "copy running-config startup-config"),
    ("show routes in junos?", "show route"),
]


# --- answer scores ----------------------------------------------------------------------------
def test_normalise_collapses_whitespace_and_folds_case():
    assert normalise("  SELECT  Name\n FROM\tt ") == "select name from t"
    assert normalise("  SELECT  Name ", case_sensitive=True) == "SELECT Name"


@pytest.mark.parametrize(
    "pred, ref, case_sensitive, want",
    [
        ("SELECT a FROM t", "select  a\nfrom t", False, 1.0),
        ("SELECT a FROM t", "select a from t", True, 0.0),
        ("SELECT a FROM t ", "SELECT a FROM t", True, 1.0),
        ("SELECT a FROM t", "SELECT a FROM t WHERE b = 1", False, 0.0),
        ("", "", False, 1.0),
    ],
)
def test_exact_match(pred, ref, case_sensitive, want):
    assert exact_match(pred, ref, case_sensitive) == want


def test_contains():
    assert contains("The answer is: show  ROUTE, of course", "show route") == 1.0
    assert contains("The answer is: show ROUTE", "show route", case_sensitive=True) == 0.0
    assert contains("show", "show route") == 0.0
    assert contains("anything", "   ") == 0.0  # an empty reference is in every string: no credit


def test_token_f1_against_hand_computed_values():
    # 2 shared tokens (a, b): precision 2/4, recall 2/3 -> F1 = 2 * 1/2 * 2/3 / (1/2 + 2/3) = 4/7
    assert token_f1("a b c d", "a b e") == pytest.approx(4 / 7)
    # bag of tokens: a x1 and b x1 shared -> precision 2/3, recall 2/3 -> F1 2/3
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert token_f1("A  B", "a b") == 1.0
    assert token_f1("A B", "a b", case_sensitive=True) == 0.0
    assert token_f1("x y", "a b") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0 and token_f1("", "a") == 0.0
    # punctuation is kept (SQL quotes matter), unlike SQuAD
    assert token_f1("WHERE x = '3'", "WHERE x = 3") == pytest.approx(0.75)


# --- perplexity, forgetting, overfitting --------------------------------------------------------
def _manual_loss(model, examples):
    """Token-weighted mean cross-entropy computed in numpy, one example at a time."""
    total, n = 0.0, 0
    for ex in examples:
        logits = np.asarray(model(mx.array(ex.ids[None, :-1])).astype(mx.float32))[0]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ex.ids) - 1), ex.ids[1:]]
        total += float((nll * ex.mask[1:]).sum())
        n += int(ex.mask[1:].sum())
    return total / n, n


def test_perplexity_is_exp_of_token_weighted_mean_loss(tiny_model):
    rng = np.random.default_rng(0)
    # Different lengths and masks: the per-token mean differs from the mean of per-example means.
    examples = []
    for length, start in ((9, 1), (30, 20), (17, 5)):
        ids = rng.integers(3, 259, size=length).astype(np.int32)
        mask = np.zeros(length, dtype=bool)
        mask[start:] = True
        examples.append(Example(ids, mask))
    want, n = _manual_loss(tiny_model, examples)
    assert n == 8 + 10 + 12
    got = evaluate(tiny_model, examples, batch_size=2, pad_id=0)
    assert got == pytest.approx(want, rel=1e-5)
    assert perplexity(got) == pytest.approx(math.exp(want), rel=1e-5)
    assert perplexity(None) is None and perplexity(1e6) == math.inf


def test_forgetting_percent_and_warning():
    f = forgetting(20.0, 23.0, 10.0)
    assert f["change_pct"] == pytest.approx(15.0) and f["warning"]
    f = forgetting(20.0, 21.0, 10.0)
    assert f["change_pct"] == pytest.approx(5.0) and not f["warning"]
    assert forgetting(20.0, 18.0, 10.0)["change_pct"] == pytest.approx(-10.0)


def _metrics(val, train):
    rows = []
    for i, v in enumerate(val):
        step = 10 * i
        rows += [{"step": step - 5, "train_loss": train[i] + 0.01}] if i else []
        rows.append({"step": step, "train_loss": train[i] if i else None, "val_loss": v})
    return rows


def test_overfitting_flag_on_synthetic_metrics():
    o = overfitting(_metrics([3.0, 2.0, 1.5, 1.6, 1.8], [3.0, 2.1, 1.4, 1.0, 0.6]))
    assert o["overfitting"] and o["best_step"] == 20 and o["best_val_loss"] == 1.5
    assert o["window_steps"] == [20, 40] and o["val_change"] == pytest.approx(0.3)
    assert o["train_change"] < 0
    still_learning = overfitting(_metrics([3.0, 2.0, 1.5, 1.4, 1.3], [3.0, 2.1, 1.4, 1.0, 0.6]))
    assert not still_learning["overfitting"] and still_learning["best_step"] == 40
    # validation rises but so does training loss: a bad learning rate, not memorising
    diverging = overfitting(_metrics([3.0, 2.0, 1.5, 1.6, 1.8], [3.0, 2.0, 1.4, 1.6, 1.9]))
    assert not diverging["overfitting"]
    assert overfitting([{"step": 5, "train_loss": 2.0}])["best_step"] is None
    assert not overfitting(_metrics([3.0], [3.0]))["overfitting"]


# --- prompts and references ---------------------------------------------------------------------
@pytest.fixture
def tok():
    return TokenizerWrapper(build_tiny_hf_tokenizer())


def test_text_reference_is_after_the_last_separator(tok):
    text = "table: t\ncolumns: A: x, B\nQ: What is A?\nA: SELECT A FROM t"
    case = make_case(1, {"text": text}, "text", tok, "A: ")
    assert case.reference == "SELECT A FROM t"
    # the space after "A:" goes with the answer: BPE glues it to the next word
    assert case.prompt == "table: t\ncolumns: A: x, B\nQ: What is A?\nA:"
    assert tok.decode(case.prompt_ids) == case.prompt and case.one_line
    other = make_case(1, {"text": "question => answer"}, "text", tok, "=>")
    assert other.reference == "answer" and other.prompt == "question =>"
    assert make_case(1, {"text": "no separator here"}, "text", tok, "A: ") is None


def test_chat_reference_is_the_last_assistant_turn(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": QA[0][0]},
        {"role": "assistant", "content": QA[0][1]},
    ]
    case = make_case(3, {"messages": msgs}, "chat", tok, "A: ", system="be brief")
    assert case.reference == QA[0][1] and case.index == 3
    assert case.prompt == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        f"<|im_start|>user\n{QA[0][0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    comp = make_case(1, {"prompt": "q?", "completion": " a "}, "completion", tok, "A: ")
    assert comp.reference == "a" and comp.prompt.endswith("q?<|im_end|>\n<|im_start|>assistant\n")


def test_text_without_any_separator_is_an_error(tok):
    with pytest.raises(DataError, match="--split-on"):
        make_cases([{"text": "a b c"}, {"text": "d"}], "text", tok, "A: ")
    cases, skipped = make_cases([{"text": "Q A: x"}, {"text": "d"}], "text", tok, "A: ")
    assert len(cases) == 1 and skipped == 1


def test_general_text_ships_hundreds_of_lines():
    text = GENERAL_TEXT.read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(text.splitlines()) >= 200 and len(paragraphs) >= 50


# --- the commands, end to end on a tiny run ------------------------------------------------------
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny_model_dir(root / "tiny")
    data = _write(root / "net.jsonl", [_chat(*QA[i % 4]) for i in range(24)])
    test = _write(root / "test.jsonl", [_chat(q, a) for q, a in QA])
    out = root / "run"
    sets = {
        "train.batch_size": 4,
        "train.grad_accumulation": 1,
        "train.grad_checkpoint": "false",
        "lora.rank": 4,
        "train.learning_rate": "1.0e-2",
        "train.warmup": 0,
        "train.iters": 16,
        "train.eval_every": 4,
    }
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        cli, ["eval", str(out), "--data", str(test), "--metric", "exact,f1", "--limit", "3"]
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model_dir, "out": out, "test": test, "output": result.output}


def test_eval_writes_summary_and_per_example_answers(tiny_run):
    out, test = tiny_run["out"], tiny_run["test"]
    s = json.loads((out / "eval" / "test.summary.json").read_text())
    assert s["lines"] == 3 and s["loss"]["examples"] == 3 and s["checkpoint"] == "final"
    for side in ("base", "fine_tune"):
        assert s["loss"][side]["perplexity"] == pytest.approx(math.exp(s["loss"][side]["loss"]))
    # training on these very answers lowers their loss; the base is the untouched model
    assert s["loss"]["fine_tune"]["loss"] < s["loss"]["base"]["loss"]
    # the base side is the untouched model: a fresh load with no LoRA at all, as this path
    # loads it (the Mac's: 4-bit with bfloat16 activations; a CPU's: a float32 copy)
    base = load_base(str(tiny_run["model"]))
    base_model, tokenizer = base.model, base.tokenizer
    records, fmt = load_eval_data(str(test), 3)
    want, _ = _manual_loss(base_model, loss_examples(records, fmt, tokenizer, 2048))
    assert s["loss"]["base"]["loss"] == pytest.approx(want, rel=1e-4)

    f = s["forgetting"]
    assert f["change_pct"] == pytest.approx(
        100 * (f["fine_tune_perplexity"] - f["base_perplexity"]) / f["base_perplexity"]
    )
    assert f["paragraphs"] >= 50 and f["threshold_pct"] == 10.0
    assert s["overfitting"]["best_step"] is not None
    assert "held-out loss" in tiny_run["output"] and "general-text perplexity" in tiny_run["output"]

    g = s["generation"]
    assert g["metrics"] == ["exact", "f1"] and g["examples"] == 3
    rows = [json.loads(x) for x in (out / g["per_example"]).read_text().splitlines()]
    assert [r["reference"] for r in rows] == [a for _, a in QA[:3]]
    for side in ("base", "fine_tune"):
        for r in rows:
            ans = r[side]["answer"]
            assert r[side]["exact"] == exact_match(ans, r["reference"])
            assert r[side]["f1"] == token_f1(ans, r["reference"])
        assert g[side]["f1"] == pytest.approx(sum(r[side]["f1"] for r in rows) / 3)
    # the base answers are mlx-lm's own greedy answers from the untouched model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QA[0][0]}], add_generation_prompt=True, tokenize=False
    )
    budget = len(tokenizer.encode(QA[0][1], add_special_tokens=False)) + 16
    plain = mlx_lm.generate(
        base_model, tokenizer, prompt, max_tokens=budget, sampler=make_sampler(temp=0.0)
    )
    assert rows[0]["base"]["answer"] == plain.strip().split("\n", 1)[0].strip()
    tuned = load_run_model(str(out)).model  # the same adapters, LoRA on
    plain = mlx_lm.generate(
        tuned, tokenizer, prompt, max_tokens=budget, sampler=make_sampler(temp=0.0)
    )
    assert rows[0]["fine_tune"]["answer"] == plain.strip().split("\n", 1)[0].strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "{root}/nope", "--data", "{test}"], "no such run folder"),
        (["eval", "{root}", "--data", "{test}"], "holds no run"),
        (["eval", "{out}", "--data", "{root}/missing.jsonl"], "no such file"),
        (["eval", "{out}", "--data", "{test}", "--metric", "bleu"], "unknown bleu"),
        (["eval", "{out}", "--data", "{test}", "--checkpoint", "step-999"], "no checkpoint"),
        (["report", "{root}/nope"], "no run there"),
    ],
)
def test_cli_errors_are_one_clean_line(tiny_run, args, message):
    args = [a.format(**tiny_run) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error:") and message in result.output
    assert "Traceback" not in result.output


def test_eval_json_is_the_summary_on_stdout_and_the_table_goes_to_stderr(
    tiny_run, tmp_path, monkeypatch
):
    # Two paragraphs, not the shipped page: this test is about what is printed where.
    general = "The river runs past the old mill.\n\nA cat sleeps in the sun.\n"
    short_general_text(monkeypatch, tmp_path, general)
    run = tmp_path / ("a-run-folder-with-a-long-name-" * 3)  # wider than 80 columns with its files
    shutil.copytree(tiny_run["out"], run)
    args = ["eval", str(run), "--data", str(tiny_run["test"]), "--metric", "f1", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((run / "eval" / "test.summary.json").read_text())
    assert_documented_keys(summary, "eval")
    assert summary["generation"]["metrics"] == ["f1"]
    lines = result.stderr.splitlines()
    title = f"{tiny_run['test']} ({summary['loss']['examples']} examples, checkpoint final)"
    assert lines[0] == title
    # the table shows the figures the JSON holds, each row whole on one line
    held = next(line for line in lines if line.startswith("held-out loss "))
    loss = summary["loss"]
    assert held.split()[2:4] == [f"{loss[side]['loss']:.4g}" for side in ("base", "fine_tune")]
    general = next(line for line in lines if line.startswith("general-text perplexity "))
    assert general.endswith(f"{summary['forgetting']['change_pct']:+.1f}%")
    assert lines[-1] == f"saved: {run}/eval/test.summary.json  answers: {run}/eval/test.jsonl"
    # without --json the same table is on stdout
    plain = CliRunner().invoke(cli, args[:-1])
    assert plain.exit_code == 0 and plain.stderr == "" and lines[1] in plain.stdout.splitlines()


# --- the report, looked at in a real browser -----------------------------------------------------
def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium: .ci/run installs it with apt-get install chromium")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return found


def _render(browser, page, tmp_path, *extra):
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2000",
        *extra,
        page.as_uri(),
    ]
    # The OpenBLAS preload the tests run under makes chromium print nothing: drop it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_report_renders_in_a_browser(tiny_run, tmp_path):
    out = tiny_run["out"]
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = out / "report.html"
    assert page.is_file()
    browser = _chromium()

    # A copy of the page that reports, once loaded, how many of its images decoded.
    probe = tmp_path / "probe.html"
    check = (
        "<script>addEventListener('load', () => { const ok = [...document.images].filter("
        "i => i.complete && i.naturalWidth > 0).length; document.body.dataset.decoded = ok; });"
        "</script></body>"
    )
    probe.write_text(page.read_text().replace("</body>", check))
    dom = _render(browser, probe, tmp_path, "--dump-dom").stdout
    assert 'data-decoded="4"' in dom  # loss, learning rate, tokens/s, memory
    s = json.loads((out / "eval" / "test.summary.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_val = [r["val_loss"] for r in metrics if r.get("val_loss") is not None][-1]
    for shown in (
        f"{last_val:.4g}",
        f"{s['loss']['base']['loss']:.4g}",
        f"{s['loss']['fine_tune']['perplexity']:.4g}",
        "general-English perplexity",
        "Sample answers",
        "show ip interface brief",
    ):
        assert shown in dom, shown

    shot = tmp_path / "shot.png"
    _render(browser, page, tmp_path, f"--screenshot={shot}")
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    ink = (pixels < 0.9).any(-1).mean()  # text, tables and plot lines on a white page
    colour = (np.ptp(pixels, axis=-1) > 0.3).mean()  # the curves are red, blue and green
    assert ink > 0.02 and colour > 0.0005, (ink, colour)
