"""The fidelity check after `macft fuse`: each export against the adapters, GGUF in llama.cpp."""

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import F16_TOL, QA, bpe_tokenizer, save_tiny_model_dir, train_with_cli, write_chat

from macft.cli import cli
from macft.data.encode import Example
from macft.data.heldout import make_case
from macft.export import fidelity, merge
from macft.export.llamacpp import LlamaCpp
from macft.lora.apply import lora_layers
from macft.runs.folder import RunDir
from macft.runs.model import load_run_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny llama with a byte-level BPE vocabulary (llama.cpp needs merges), trained until
    its answers differ from the base's; float32 so that an f32 export is the same model."""
    root = tmp_path_factory.mktemp("fidelity")
    tok = bpe_tokenizer()
    base = save_tiny_model_dir(root / "base", vocab_size=len(tok.get_vocab()))
    tok._tokenizer.save_pretrained(str(base))
    data = write_chat(root / "net.jsonl", 24, QA)
    settings = {
        "model.compute": "float32",
        "train.iters": 12,
        "train.batch_size": 4,
        "train.learning_rate": "1.0e-2",
        "train.warmup": 0,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.grad_checkpoint": "false",
        "data.valid_fraction": 0.25,
        "lora.rank": 8,
    }
    return train_with_cli(base, data, root / "net", settings)


def fuse(*args):
    result = CliRunner().invoke(cli, ["fuse", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def entries(folder) -> dict:
    return json.loads((folder / fidelity.FILE).read_text())["exports"]


def test_a_faithful_mlx_export_agrees_with_the_adapters(run, tmp_path):
    """Merged into the very 4-bit weights the run trained on, in float32: the same model."""
    out = fuse(run, "--dtype", "f32", "--base-weights", "quantized", "--out", tmp_path / "x")
    e = entries(tmp_path / "x")["mlx"]
    print(out)
    assert "fidelity: mlx: 100% of next tokens agree with the adapters" in out, out
    assert e["kind"] == "mlx" and e["examples"] == 6 and "validation" in e["source"]
    assert e["next_token_agreement"] == 1.0 and e["greedy_same"] == e["greedy_compared"] > 0
    assert e["loss"]["adapters"] < e["loss"]["base"] - 0.1  # the adapters learned something
    assert abs(e["loss"]["export"] - e["loss"]["adapters"]) < 1e-3
    assert abs(e["kept"] - 1) < 0.01 and not e["lost"] and "warning" not in out


def _without_adapters(model, dtype, release=False):
    """The merge with the adapters dropped: what a wrong scale or a lost tensor does."""
    for _, layer in lora_layers(model):
        layer.lora_b = mx.zeros_like(layer.lora_b)
    return merge.fused_tensors(model, dtype, release=release)


def test_an_export_that_lost_the_adapters_is_warned_about(run, tmp_path, monkeypatch):
    """The export is written, and the check says it behaves like the base, with what to try."""
    monkeypatch.setattr("macft.export.mlx_folder.fused_tensors", _without_adapters)
    out = fuse(run, "--dtype", "f32", "--quantize", "4", "--out", tmp_path / "x")
    e = entries(tmp_path / "x")["mlx"]
    assert (tmp_path / "x" / "mlx" / "config.json").is_file()
    assert e["lost"] and e["kept"] < fidelity.KEPT_WARN, e
    assert abs(e["loss"]["export"] - e["loss"]["base"]) < abs(
        e["loss"]["export"] - e["loss"]["adapters"]
    )
    assert "warning: mlx lost much of what the adapters learned" in " ".join(out.split())
    assert "--quantize 8" in out and "lora.rank" in out
    assert any("--quantize 8" in tip for tip in e["advice"])


def test_gguf_is_checked_in_llama_cpp(run, tmp_path):
    out = fuse(run, "--gguf", "--out", tmp_path / "x")
    e = entries(tmp_path / "x")["net-f16.gguf"]
    print(out)
    assert e["kind"] == "gguf" and "fidelity: net-f16.gguf:" in out
    # f16 weights and an f16 KV cache in llama.cpp: near ties may flip, little else. The
    # greedy answers are compared, not asserted equal: this tiny model's run through near ties
    # (the next test checks llama.cpp's greedy steps token by token).
    assert e["next_token_agreement"] >= 0.9, e
    assert e["greedy_compared"] == 6, e
    assert abs(e["loss"]["export"] - e["loss"]["adapters"]) < 0.05, e
    assert not e["lost"]


def test_llama_cpp_scores_are_the_model_log_probabilities(run, tmp_path):
    """llama.cpp's forced-token log-probabilities are MLX's for the same weights (the run's own
    4-bit base merged), within f16 rounding. llama.cpp reuses the prompt it cached for the
    last request, so a position may be recomputed in another batch shape: one token of 47
    moved 0.0205 so (0.0048 with cache_prompt off), the rest under 0.001; hence 2 x F16_TOL."""
    from macft.export.llamacpp import LlamaCpp

    fuse(run, "--gguf", "--base-weights", "quantized", "--out", tmp_path / "x", "--no-check")
    ref = fidelity.reference(RunDir(run), None, 2, None)
    llama = LlamaCpp(tmp_path / "x" / "net-f16.gguf", n_ctx=256)
    side = fidelity.llamacpp_side(llama, ref.tokenizer, ref.sample)
    for got, want in zip(side.logps, ref.adapters.logps, strict=True):
        assert got.shape == want.shape and np.abs(got - want).max() < 2 * F16_TOL


def test_llama_cpp_greedy_steps_are_mlx_s_best_tokens(run, tmp_path):
    """Each token llama.cpp picks greedily is MLX's best there, or within f16 rounding of it
    (a near tie: whole answers of a tiny random model may then part, so they are not compared
    here). The export is the run's own 4-bit base merged, so both hold the same weights."""
    from macft.export.llamacpp import LlamaCpp

    fuse(run, "--gguf", "--base-weights", "quantized", "--out", tmp_path / "x", "--no-check")
    loaded = load_run_model(str(run), None, None)
    model, cases = loaded.model, fidelity.sample(RunDir(run), loaded.tokenizer, 6, None).cases
    llama = LlamaCpp(tmp_path / "x" / "net-f16.gguf", n_ctx=256)
    clear = 0
    for case in cases:
        prompt = list(case.prompt_ids)
        said = llama.greedy(prompt, 16)
        logits = model(mx.array([prompt + said]))[0, len(prompt) - 1 : -1].astype(mx.float32)
        for row, token in zip(np.array(logits), said, strict=True):
            assert row.max() - row[token] < 2 * F16_TOL, (case.prompt, said)
            top2 = np.sort(row)[-2:]
            clear += int(top2[1] - top2[0] >= 2 * F16_TOL)
    assert clear >= 30  # most steps are not near ties: the test compares real choices


def test_peft_gives_back_the_adapters_and_a_changed_alpha_is_caught(run, tmp_path):
    out = fuse(run, "--peft", "--out", tmp_path / "x")
    assert "give back the adapters exactly" in out
    assert entries(tmp_path / "x")["peft"]["exact"]
    config = tmp_path / "x" / "peft" / "adapter_config.json"
    c = json.loads(config.read_text())
    config.write_text(json.dumps({**c, "lora_alpha": c["lora_alpha"] * 2}))
    ref = fidelity.reference(RunDir(run), None, 2, None)
    r = fidelity.peft_result(tmp_path / "x" / "peft", ref)
    assert not r["exact"] and r["lost"] and r["max_abs_diff"] == 0.0


def test_no_check_and_a_stale_entry(run, tmp_path):
    fuse(run, "--dtype", "f32", "--out", tmp_path / "x", "--check", "2")
    assert entries(tmp_path / "x")["mlx"]["examples"] == 2
    out = fuse(run, "--dtype", "f32", "--out", tmp_path / "x", "--no-check")
    assert "fidelity:" not in out
    assert "mlx" not in entries(tmp_path / "x")  # it described the file this fuse replaced


def test_missing_data_is_a_note_and_check_data_replaces_it(run, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    recipe = RunDir(moved).recipe()
    data = recipe["data"]["path"]
    recipe["data"]["path"] = str(tmp_path / "gone.jsonl")
    (moved / "recipe.yaml").write_text(json.dumps(recipe))
    out = fuse(moved, "--dtype", "f32")
    assert "no fidelity check" in out and "gone.jsonl" in out and "--check-data" in out
    assert not (moved / "export" / fidelity.FILE).exists()
    out = fuse(moved, "--dtype", "f32", "--check-data", data, "--check", "3")
    e = entries(moved / "export")["mlx"]
    assert e["examples"] == 3 and e["source"] == f"3 examples, --check-data {data}"


def test_bad_check_count_is_one_line(run):
    result = CliRunner().invoke(cli, ["fuse", str(run), "--check", "0"])
    assert result.exit_code == 2 and "--check" in result.output
    assert "Traceback" not in result.output


def test_an_overflowing_export_is_lost_not_a_crash():
    """NaN from float16 overflow: the loss is not finite, the advice names --dtype bf16."""
    good = fidelity.Side([np.array([-1.0, -2.0])], [np.array([3, 4])], ["a"])
    base = fidelity.Side([np.array([-3.0, -3.0])], [np.array([5, 4])], [])
    nan = fidelity.Side([np.array([np.nan, np.nan])], [np.array([0, 0])], ["b"])
    r = fidelity.compare(nan, good, base)
    assert r["lost"] and not r["finite"] and r["kept"] is None
    assert r["next_token_agreement"] == 0 and r["greedy_same"] == 0
    tips = fidelity.advice("mlx", r, {"dtype": "f16"}, "float")
    assert tips[0].startswith("--dtype bf16")
    assert "lost the fine-tune" in fidelity.warning("mlx", r, tips)
    half = fidelity.Side([np.array([-2.0, -2.5])], [np.array([3, 9])], ["a"])
    r = fidelity.compare(half, good, base)
    assert r["next_token_agreement"] == 0.5 and r["greedy_same"] == 1
    assert r["kept"] == pytest.approx((3.0 - 2.25) / (3.0 - 1.5)) and not r["lost"]


def test_report_shows_the_exports_check(run, tmp_path, monkeypatch):
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    monkeypatch.setattr("macft.export.mlx_folder.fused_tensors", _without_adapters)
    fuse(moved, "--quantize", "4", "--check", "3")
    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["report", str(moved)])
    assert result.exit_code == 0, result.output
    page = (moved / "report.html").read_text()
    assert "Exports: do they keep the fine-tune?" in page and "<td>mlx</td>" in page
    assert "lost much of what the adapters learned" in page and "--quantize 8" in page


def test_llama_cpp_answers_end_where_mlx_answers_end():
    """llama.cpp hands back the end-of-turn token it stopped at; mlx_lm's answers never hold it:
    left in, not one greedy answer would match (seen on real data: 1/100)."""
    tok = bpe_tokenizer()
    answer = tok.encode("the cat", add_special_tokens=False)

    class Llama:
        def score(self, ids, first):
            return [0.0] * (len(ids) - first), ids[first:]

        def greedy(self, prompt, n):
            return [*answer, tok.eos_token_id, *answer]

    case = make_case(1, {"prompt": "q", "completion": "the cat"}, "completion", tok, "A: ")
    ex = Example(np.array([1, 2, 3]), np.array([False, True, True]))
    side = fidelity.llamacpp_side(Llama(), tok, fidelity.Sample([ex], [case], "test"))
    assert side.answers == ["the cat"]


def test_a_null_log_probability_from_llama_cpp_is_a_lost_token_not_a_crash():
    """llama.cpp writes log(0) or NaN as JSON null (seen on a strongly trained tiny model):
    the export's loss is not finite and the check says the fine-tune is lost."""
    steps = iter([-0.5, None])

    class Server:
        def handle_completions(self, request):
            lp = next(steps)
            tops = [{"id": 7, "logprob": -0.1}]
            return {"choices": [{"logprobs": {"content": [{"logprob": lp, "top_logprobs": tops}]}}]}

    llama = LlamaCpp.__new__(LlamaCpp)
    llama.server = Server()
    logps, tops = llama.score([1, 2, 3, 4], 2)
    assert logps == [-0.5, -math.inf] and tops == [7, 7]
    good = fidelity.Side([np.array([-1.0, -2.0])], [np.array([7, 7])], ["a"])
    base = fidelity.Side([np.array([-3.0, -3.0])], [np.array([5, 4])], [])
    export = fidelity.Side([np.array(logps)], [np.array(tops)], ["a"])
    r = fidelity.compare(export, good, base)
    assert r["lost"] and not r["finite"] and r["next_token_agreement"] == 1
