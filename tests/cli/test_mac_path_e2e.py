"""The Mac's path end to end on the real SmolLM2 GGUF: train -> chat -> eval -> fuse -> GGUF.

The 4-bit base with bfloat16 activations through MLX's quantized matmuls, as on a Mac. On this
CPU that matmul runs at ~0.2 GFLOP/s, so the run is one step on short rows, adapters on the last
two layers only (the backward pass stops there), and eval's forgetting check reads a sentence.
"""

import json

import mlx_lm
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from helpers import short_general_text

from macft.cli import cli

pytestmark = [pytest.mark.real, pytest.mark.path("mac")]

SYSTEM = "Be brief."
QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("show routes in junos?", "show route"),
]


def chat(question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_train_chat_eval_fuse_on_the_macs_path(smollm2_gguf, tmp_path, monkeypatch):
    data = tmp_path / "qa.jsonl"
    # chat lines with a short system prompt: 31 tokens fit a 32-wide row (the template's
    # default system prompt takes 44, and a 64-wide row costs every pass below twice the time)
    data.write_text("".join(json.dumps({"messages": chat(q, a)}) + "\n" for q, a in QA))
    run = tmp_path / "run"
    sets = {"train.iters": 1, "train.batch_size": 1, "train.grad_accumulation": 1,
            "train.eval_every": 0, "train.save_every": 0, "data.valid_fraction": 0.0,
            "data.max_seq_length": 48, "lora.rank": 4, "lora.layers": 2}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    result = run_cli("train", "--model", smollm2_gguf, "--data", data, "--out", run, *args)
    assert "the Mac's path on a CPU" in result.output
    base = json.loads((run / "base.json").read_text())
    assert (base["compute"], base["activations"]) == ("quantized", "bfloat16")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and metrics[-1]["compiled_shapes"] == 1

    answer = run_cli(
        "chat", run, "--system", SYSTEM, "--prompt", QA[0][0], "--temp", "0", "--max-tokens", "3"
    )
    assert answer.stdout.strip()

    short_general_text(
        monkeypatch, tmp_path, "The river runs past the old mill and into the sea.\n"
    )
    run_cli("eval", run, "--data", data, "--limit", "1")
    (summary,) = (run / "eval").glob("*.summary.json")
    loss = json.loads(summary.read_text())["loss"]
    assert 0 < loss["fine_tune"]["loss"] < 20 and loss["base"]["loss"] != loss["fine_tune"]["loss"]

    # The fidelity check on the GGUF only, on one example: the reference's greedy answer runs
    # on MLX's bfloat16 quantized kernels, which crawl on a CPU.
    run_cli("fuse", run, "--no-check")
    model, tokenizer = mlx_lm.load(str(run / "export" / "mlx"))
    assert tokenizer.encode("show route") and model.model.layers[29].self_attn.q_proj.weight.ndim
    result = run_cli("fuse", run, "--gguf", "--quant", "q8_0", "--check", "1")
    assert "fidelity: run-q8_0.gguf:" in result.output
    check = json.loads((run / "export" / "fidelity.json").read_text())["exports"]["run-q8_0.gguf"]
    print(check)
    # The reference computes in bfloat16 (the Mac's path), llama.cpp in float32: on this
    # 5-token answer bfloat16 alone puts the loss 0.37 nats above the float32 path's (4.45 vs
    # 4.08; the q8_0 export 3.99), so a near tie may flip. Measured: 4 of 5 tokens agree.
    assert check["positions"] == 5 and check["finite"] and not check["lost"]
    assert check["next_token_agreement"] >= 0.6
    (path,) = (run / "export").glob("*.gguf")
    names = {t.name for t in GGUFReader(path).tensors}
    assert "blk.29.attn_q.weight" in names and "output_norm.weight" in names
