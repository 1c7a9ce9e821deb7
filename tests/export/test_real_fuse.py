"""The real SmolLM2 GGUF fine-tuned a few steps, fused, exported to GGUF and run by llama.cpp."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.sample_utils import make_sampler

from macft.cli import cli
from macft.export.llamacpp import LlamaCpp

# The CPU's path (trained and fused in float32): on the Mac's path this module takes ~3 minutes
# here, and tests/cli/test_mac_path_e2e.py already fuses and exports a Mac-path run.
pytestmark = [pytest.mark.real, pytest.mark.path("cpu")]

QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("list interfaces on cisco ios?", "show ip interface brief"),
    ("save the config on cisco ios?", "copy running-config startup-config"),
    ("show routes in junos?", "show route"),
]
PROMPTS = [
    "show bgp summary in junos?",
    "Which city is the capital of Germany?",
    "Name three colours of the rainbow.",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def run(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-fuse")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    out = root / "net"
    args = ["train", "--model", str(smollm2_gguf), "--data", str(data), "--out", str(out)]
    sets = {
        "model.compute": "float32",
        "train.iters": 3,
        "train.batch_size": 2,
        "train.grad_checkpoint": "false",
        "train.learning_rate": "2.0e-3",
        "train.warmup": 0,
        "train.eval_every": 0,
        "train.save_every": 0,
        "data.valid_fraction": 0.0,
        "lora.rank": 8,
        "lora.layers": 8,
    }
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def mlx_answers(model, tokenizer) -> list[list[int]]:
    answers = []
    for p in PROMPTS:
        ids = prompt_ids(tokenizer, p)
        gen = mlx_lm.stream_generate(
            model, tokenizer, ids, max_tokens=MAX_TOKENS, sampler=make_sampler(0.0)
        )
        tokens = [r.token for r in gen]
        answers.append([t for t in tokens if t not in tokenizer.eos_token_ids])
    return answers


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    msgs = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of answer tokens, position by position, before the two answers part."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same, total = same + n, total + max(len(x), len(y), 1)
    return same / total


def mlx_logprobs(model, tokenizer, reference) -> list[np.ndarray]:
    """MLX's log-probabilities for each next token along its own answers."""
    out = []
    for p, ref in zip(PROMPTS, reference, strict=True):
        ids = prompt_ids(tokenizer, p)
        logits = model(mx.array([ids + ref]))[0, len(ids) - 1 : len(ids) + len(ref) - 1]
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), np.float32))
    return out


def next_token_agreement(llama: LlamaCpp, tokenizer, reference, logprobs) -> tuple[float, float]:
    """Teacher-forced along MLX's answers: how often llama.cpp's next greedy token is MLX's, and
    the most log-probability MLX gives up where they differ (small: a near tie, not a change)."""
    same = total = 0
    worst = 0.0
    for p, ref, lp in zip(PROMPTS, reference, logprobs, strict=True):
        ids = prompt_ids(tokenizer, p)
        for k, want in enumerate(ref):
            (got,) = llama.greedy(ids + ref[:k], 1)
            same, total = same + (got == want), total + 1
            worst = max(worst, float(lp[k].max() - lp[k, got]))
    return same / total, worst


def test_fused_gguf_answers_like_mlx(run, tmp_path):
    """f16: llama.cpp picks MLX's next token along MLX's answers, but for near ties (f16
    rounding moves a tie either way, and one tie parts the greedy answers from there on).
    q4_k_m: re-quantizing a 135M model moves some greedy choices; its next-token agreement
    along MLX's answers is what is checked (measured: see the report)."""
    mlx_dir = tmp_path / "mlx-export"
    # --no-check: fuse's own check is the next test's; this one compares by hand
    args = ["fuse", str(run), "--dtype", "f32", "--out", str(mlx_dir), "--no-check"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    model, tokenizer = mlx_lm.load(str(mlx_dir / "mlx"))
    reference = mlx_answers(model, tokenizer)
    assert all(reference), reference
    logprobs = mlx_logprobs(model, tokenizer, reference)
    assert tokenizer.decode(reference[0]).startswith("show bgp summary")  # the fine-tune took

    export = run / "export"
    greedy, forced, gap = {}, {}, {}
    for quant in ("f16", "q4_k_m"):
        result = CliRunner().invoke(
            cli, ["fuse", str(run), "--gguf", "--quant", quant, "--no-check"]
        )
        assert result.exit_code == 0, result.output
        assert f"ollama create net -f {export / 'Modelfile'}" in result.output
        llama = LlamaCpp(export / f"net-{quant}.gguf", n_ctx=256)
        answers = [llama.greedy(prompt_ids(tokenizer, p), MAX_TOKENS) for p in PROMPTS]
        answers = [[t for t in a if t not in tokenizer.eos_token_ids] for a in answers]
        greedy[quant] = agreement(reference, answers)
        forced[quant], gap[quant] = next_token_agreement(llama, tokenizer, reference, logprobs)
        print(f"{quant}: greedy {greedy[quant]:.0%}, next-token {forced[quant]:.0%} like MLX,"
              f" MLX gives up at most {gap[quant]:.3f} nats where they differ")  # fmt: skip
        for ref, got in zip(reference, answers, strict=True):
            print(f"  mlx  {tokenizer.decode(ref)!r}\n  gguf {tokenizer.decode(got)!r}")
        del llama
    modelfile = (export / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./net-q4_k_m.gguf\n") and "<|im_start|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" in modelfile
    assert forced["f16"] >= 0.9 and gap["f16"] < 0.1, (greedy, forced, gap)
    assert forced["q4_k_m"] >= 0.8, (greedy, forced, gap)


def test_the_fidelity_check_sees_what_llama_cpp_does(run):
    """fuse's own check, on the run's training lines (it held none out): the f16 GGUF and the
    GGUF LoRA on the very Q4_1 file the run trained on (dequantized) are the adapters' model."""
    for args in (["--gguf"], ["--gguf", "--adapter-only"]):
        result = CliRunner().invoke(cli, ["fuse", str(run), *args, "--check", "2"])
        assert result.exit_code == 0, result.output
        assert "fidelity: net-" in result.output, result.output
    checks = json.loads((run / "export" / "fidelity.json").read_text())["exports"]
    print(json.dumps(checks, indent=1))
    for name in ("net-f16.gguf", "net-lora.gguf"):
        e = checks[name]
        assert e["examples"] == 2 and "training lines" in e["source"]
        assert e["next_token_agreement"] >= 0.9 and not e["lost"], e
        assert abs(e["loss"]["export"] - e["loss"]["adapters"]) < 0.05, e
    assert checks["net-lora.gguf"]["loss"]["adapters"] < checks["net-lora.gguf"]["loss"]["base"]
