"""The real SmolLM2 GGUF fine-tuned a few steps, fused, exported to GGUF and run by llama.cpp."""

import json

import mlx_lm
import pytest
from click.testing import CliRunner
from mlx_lm.sample_utils import make_sampler

from macft.cli import cli

pytestmark = pytest.mark.real

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


class LlamaCpp:
    """A GGUF in llama.cpp (xllamacpp), greedy, token ids in and out."""

    def __init__(self, gguf):
        import xllamacpp as xl

        params = xl.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = 256
        params.n_parallel = 1
        # One thread: two spin-waiting threads crawl when other work shares the two cores.
        params.cpuparams.n_threads = 1
        params.cpuparams_batch.n_threads = 1
        params.warmup = False
        self.server = xl.Server(params)

    def generate(self, ids: list[int], n: int) -> list[int]:
        request = {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1, "logprobs": 1}
        r = self.server.handle_completions(request)
        return [t["id"] for t in r["choices"][0]["logprobs"]["content"]]


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


def next_token_agreement(llama: LlamaCpp, tokenizer, reference) -> float:
    """Teacher-forced: along MLX's answers, how often llama.cpp's next greedy token is MLX's."""
    same = total = 0
    for p, ref in zip(PROMPTS, reference, strict=True):
        ids = prompt_ids(tokenizer, p)
        for k, want in enumerate(ref):
            same += llama.generate(ids + ref[:k], 1) == [want]
            total += 1
    return same / total


def test_fused_gguf_answers_like_mlx(run, tmp_path):
    """f16: the same greedy answers as MLX's fused model, token for token. q4_k_m: re-quantizing
    a 135M model moves some greedy choices, so answers part after a few tokens; its
    next-token agreement along MLX's answers is what is checked (measured: see the report)."""
    mlx_dir = tmp_path / "mlx-export"
    result = CliRunner().invoke(cli, ["fuse", str(run), "--dtype", "f32", "--out", str(mlx_dir)])
    assert result.exit_code == 0, result.output
    model, tokenizer = mlx_lm.load(str(mlx_dir / "mlx"))
    reference = mlx_answers(model, tokenizer)
    assert all(reference), reference
    assert tokenizer.decode(reference[0]).startswith("show bgp summary")  # the fine-tune took

    export = run / "export"
    greedy, forced = {}, {}
    for quant in ("f16", "q4_k_m"):
        result = CliRunner().invoke(cli, ["fuse", str(run), "--gguf", "--quant", quant])
        assert result.exit_code == 0, result.output
        assert f"ollama create net -f {export / 'Modelfile'}" in result.output
        llama = LlamaCpp(export / f"net-{quant}.gguf")
        answers = [llama.generate(prompt_ids(tokenizer, p), MAX_TOKENS) for p in PROMPTS]
        answers = [[t for t in a if t not in tokenizer.eos_token_ids] for a in answers]
        greedy[quant] = agreement(reference, answers)
        forced[quant] = next_token_agreement(llama, tokenizer, reference)
        print(f"{quant}: greedy {greedy[quant]:.0%}, next-token {forced[quant]:.0%} like MLX")
        for ref, got in zip(reference, answers, strict=True):
            print(f"  mlx  {tokenizer.decode(ref)!r}\n  gguf {tokenizer.decode(got)!r}")
        del llama
    modelfile = (export / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./net-q4_k_m.gguf\n") and "<|im_start|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" in modelfile
    assert greedy["f16"] == 1.0 and forced["f16"] == 1.0, (greedy, forced)
    assert forced["q4_k_m"] >= 0.8, (greedy, forced)
