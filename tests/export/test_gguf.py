"""GGUF export read by a real llama.cpp (xllamacpp): logits and greedy tokens against MLX."""

import errno

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from helpers import (
    ARCHS,
    F16_TOL,
    MOE,
    PROMPT,
    bpe_tokenizer,
    build_arch,
    compare,
    llama_cpp,
    mlx_greedy,
    mlx_logprobs,
    skipped_tokens,
    spm_tokenizer,
    tiny_config,
    weights_as_stored,
)
from mlx.utils import tree_flatten, tree_unflatten
from tokenizers import normalizers

from macft.config.schema import LoraConfig
from macft.errors import ExportError
from macft.export.gguf.adapter import export_adapter_gguf
from macft.export.gguf.quant import decode
from macft.export.gguf.writer import export_gguf
from macft.export.merge import fused_model
from macft.lora.apply import apply_lora
from macft.models import load_base

N_STEPS = 12
# q8_0 / q4_k_m against MLX running the very weights the file holds (dequantized from its
# bytes): what is left is llama.cpp rounding activations to 8 bits for quantized matmuls
# (~1/127 per block); measured max 0.057 over all architectures.
STORED_TOL = 0.1
# Against the float model the quantization error itself adds; on random weights (no structure
# for K-quants to exploit, flat next-token distributions) measured mean 0.018 (q8_0) and 0.145
# (q4_k_m); the bounds leave room and still catch a wrong layout (mean error above 1).
FLOAT_MEAN_TOL = {"q8_0": 0.05, "q4_k_m": 0.25}
WIDE = {"hidden_size": 256, "intermediate_size": 512}  # K-quants need rows of 256
HF = {"kind": "hf"}


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode(PROMPT)


@pytest.fixture(scope="module")
def skip(tok):
    return skipped_tokens(tok)


def wide(arch: str) -> dict:
    config = tiny_config(arch, **WIDE)
    if "head_dim" in config:
        config["head_dim"] = 64
    if "query_pre_attn_scalar" in config:
        config["query_pre_attn_scalar"] = 64  # llama.cpp scales by head_dim for small Gemmas
    return config


def decisive_flips(result: dict, tolerance: float) -> list[int]:
    """Steps where the top-1 differs although MLX's lead exceeds twice the log-prob tolerance."""
    return [
        i
        for i, (same, lead) in enumerate(zip(result["agree_list"], result["margins"], strict=True))
        if not same and lead > 2 * tolerance
    ]


@pytest.mark.parametrize("arch", [*ARCHS, *MOE])
def test_f16_greedy_tokens_match_mlx(arch, tok, prompt, skip, tmp_path):
    config = tiny_config(arch)
    model = build_arch(config)
    calls = []
    summary = export_gguf(
        model, config, tok, HF, tmp_path / "m.gguf", "f16", progress=lambda *a: calls.append(a)
    )
    steps = llama_cpp(summary["path"], prompt, N_STEPS, skip)
    result = compare(model, prompt, steps, skip)
    print(f"{arch} f16: max |dlogprob| {result['max_diff']:.4f}, mean {result['mean_diff']:.4f}")
    assert [s["id"] for s in steps] == mlx_greedy(model, prompt, N_STEPS, skip)
    assert result["max_diff"] <= F16_TOL, result
    n = summary["tensors"]
    assert calls == [(i, n) for i in range(1, n + 1)]
    assert summary["size"] == (tmp_path / "m.gguf").stat().st_size
    assert summary["qtype"] == "f16" and summary["types"].keys() <= {"F16", "F32"}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_gguf_close_to_mlx(arch, qtype, tok, prompt, skip, tmp_path):
    config = wide(arch)
    model = build_arch(config)
    path = export_gguf(model, config, tok, HF, tmp_path / "m.gguf", qtype)["path"]
    steps = llama_cpp(path, prompt, N_STEPS, skip)
    stored = build_arch(config)
    weights_as_stored(stored, config, path)
    exact = compare(stored, prompt, steps, skip)
    versus_float = compare(model, prompt, steps, skip)
    print(
        f"{arch} {qtype}: stored weights max {exact['max_diff']:.4f}; float model mean "
        f"{versus_float['mean_diff']:.4f}, top-1 agreement {versus_float['agree']:.0%}"
    )
    assert exact["max_diff"] <= STORED_TOL, exact
    assert not decisive_flips(exact, STORED_TOL), exact
    assert versus_float["mean_diff"] <= FLOAT_MEAN_TOL[qtype], versus_float


@pytest.mark.parametrize("qtype", ["bf16", "q4_0"])
def test_other_types_load_and_match(qtype, tok, prompt, skip, tmp_path):
    config = wide("mistral")
    model = build_arch(config)
    summary = export_gguf(model, config, tok, HF, tmp_path / "m.gguf", qtype)
    weights_as_stored(model, config, summary["path"])
    result = compare(model, prompt, llama_cpp(summary["path"], prompt, N_STEPS, skip), skip)
    assert result["max_diff"] <= STORED_TOL, result
    assert qtype.upper() in summary["types"]


def _types(path) -> dict:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def test_q4_k_m_mixture_follows_llama_cpp(tok, prompt, skip, tmp_path):
    # 8 layers: llama.cpp's use_more_bits picks layers 0, 3, 6 and 7 for attn_v / ffn_down.
    # ffn_down rows of 320 are no multiple of 256: Q4_K falls back to Q5_0, Q6_K to Q8_0.
    config = tiny_config("mistral", hidden_size=256, intermediate_size=320, num_hidden_layers=8)
    model = build_arch(config)
    path = export_gguf(model, config, tok, HF, tmp_path / "m.gguf", "q4_k_m")["path"]
    types = _types(path)
    more = {0, 3, 6, 7}
    for i in range(8):
        assert types[f"blk.{i}.attn_v.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert types[f"blk.{i}.ffn_down.weight"] == ("Q8_0" if i in more else "Q5_0")
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    weights_as_stored(model, config, path)
    result = compare(model, prompt, llama_cpp(path, prompt, N_STEPS, skip), skip)
    assert result["max_diff"] <= STORED_TOL, result

    # Tied embeddings: the embedding is the output matrix, so it gets Q6_K.
    config = tiny_config("qwen3", **WIDE, head_dim=64)
    path = export_gguf(build_arch(config), config, tok, HF, tmp_path / "t.gguf", "q4_k_m")["path"]
    types = _types(path)
    assert "output.weight" not in types and types["token_embd.weight"] == "Q6_K"


def _with_adapter(model, seed=1):
    info = apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=0.0))
    mx.random.seed(seed)  # lora_b starts at zero; give it weight so the adapter matters
    b = [
        (k, 0.3 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())
    ]
    model.update(tree_unflatten([(k, v) for k, v in b if k.endswith("lora_b")]))
    mx.eval(model.parameters())
    return info


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3"])
def test_adapter_gguf_in_llama_cpp_matches_mlx(arch, tok, prompt, skip, tmp_path):
    config = tiny_config(arch)
    model = build_arch(config)
    base = export_gguf(model, config, tok, HF, tmp_path / "base.gguf", "f16")["path"]
    info = _with_adapter(model)
    summary = export_adapter_gguf(model, config, info.adapter_config(), tmp_path / "a.gguf", HF)
    reader = GGUFReader(summary["path"])
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    with_lora = llama_cpp(base, prompt, N_STEPS, skip, lora=summary["path"])
    result = compare(model, prompt, with_lora, skip)
    print(f"{arch} LoRA adapter: max |dlogprob| {result['max_diff']:.4f}")
    assert [s["id"] for s in with_lora] == mlx_greedy(model, prompt, N_STEPS, skip)
    assert result["max_diff"] <= F16_TOL, result
    without = compare(model, prompt, llama_cpp(base, prompt, N_STEPS, skip), skip)
    assert without["max_diff"] > 10 * F16_TOL  # the adapter really changed the model


def test_round_trip_from_a_gguf_source(tok, prompt, skip, tmp_path):
    """Train on a GGUF, export a GGUF: same tokenizer fields, same weights, same tokens."""
    config = tiny_config("llama")
    src = export_gguf(build_arch(config), config, tok, HF, tmp_path / "src.gguf", "q8_0")["path"]
    base = load_base(src, compute="float32")
    assert base.source["kind"] == "gguf"
    summary = export_gguf(
        base.model, base.config, base.tokenizer, base.source, tmp_path / "out.gguf", "q8_0"
    )
    assert summary["vocab"] == "copied from src.gguf"
    a, b = GGUFReader(src), GGUFReader(summary["path"])
    tok_a = {k: f.contents() for k, f in a.fields.items() if k.startswith("tokenizer.")}
    tok_b = {k: f.contents() for k, f in b.fields.items() if k.startswith("tokenizer.")}
    assert tok_a == tok_b and "tokenizer.ggml.merges" in tok_b
    tensors_b = {t.name: t for t in b.tensors}
    assert {t.name for t in a.tensors} == set(tensors_b)  # rope_freqs included
    for t in a.tensors:
        u = tensors_b[t.name]
        assert u.tensor_type == t.tensor_type
        x, y = decode(np.asarray(t.data), t.tensor_type), decode(np.asarray(u.data), u.tensor_type)
        # the loader dequantizes Q8_0 through float16 scales: one f16 rounding (2^-11) at most
        assert np.abs(x - y).max() <= 1e-3 * np.abs(x).max(), t.name
    steps = llama_cpp(summary["path"], prompt, N_STEPS, skip)
    assert [s["id"] for s in steps] == mlx_greedy(base.model, prompt, N_STEPS, skip)


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_text_prompt_tokenizes_as_the_hf_tokenizer(kind, tok, tmp_path):
    """llama.cpp tokenizes text from the GGUF's vocabulary: counts and next-token odds agree."""
    if kind == "bpe":
        tokenizer, source, arch = tok, HF, "qwen2"
    else:
        tokenizer, folder = spm_tokenizer(tmp_path / "spm")
        source, arch = {"kind": "hf", "path": str(folder)}, "gemma3"
    config = tiny_config(arch, vocab_size=336)
    model = build_arch(config)
    summary = export_gguf(model, config, tokenizer, source, tmp_path / "m.gguf", "f16")
    text = "the cat sat on the mat, 12 times over"
    ids = tokenizer.encode(text)  # BOS included when the tokenizer adds one
    steps, usage = llama_cpp(summary["path"], text, 1, [], with_usage=True)
    assert usage["prompt_tokens"] == len(ids)
    lp = mlx_logprobs(model, ids)[-1]
    assert max(abs(lp[t] - v) for t, v in steps[0]["top"].items()) <= F16_TOL


def test_unsupported_architecture_is_a_clear_error(tok, tmp_path):
    config = tiny_config("mistral")
    with pytest.raises(ExportError, match="'gpt_neox'.*supported: .*gemma2.*phi3.*qwen3"):
        export_gguf(
            build_arch(config), {**config, "model_type": "gpt_neox"}, tok, HF, tmp_path / "x"
        )
    assert not list(tmp_path.iterdir())


def test_unknown_or_unfaithful_pre_tokenizer_is_refused(tok, tmp_path):
    from tokenizers import Regex, pre_tokenizers

    config = tiny_config("qwen2")
    model = build_arch(config)
    backend = tok._tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d+|\D+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    try:
        with pytest.raises(ExportError, match="pre-tokenizer .*Split \\+ ByteLevel.*llama.cpp"):
            export_gguf(model, config, tok, HF, tmp_path / "x.gguf")
        # a known pre-tokenizer, but a normalizer llama.cpp would not apply
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.normalizer = normalizers.Lowercase()
        with pytest.raises(ExportError, match="would split .* differently"):
            export_gguf(model, config, tok, HF, tmp_path / "x.gguf")
    finally:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.normalizer = None
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_are_merged_as_the_file_is_written(tok, tmp_path, dora):
    """A model with LoRA (or DoRA) layers writes the tensors of its fused model, each merged
    when its turn comes: the same file as exporting the fused model held in memory."""
    config = tiny_config("llama")
    model = build_arch(config)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dora=dora, dropout=0.0))
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    export_gguf(model, config, tok, HF, tmp_path / "lazy.gguf", "f16")
    export_gguf(
        fused_model(model, config, mx.float32), config, tok, HF, tmp_path / "whole.gguf", "f16"
    )
    lazy = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "lazy.gguf").tensors}
    whole = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "whole.gguf").tensors}
    assert lazy.keys() == whole.keys() and not any("lora" in k for k in lazy)
    for name in whole:
        assert np.array_equal(lazy[name], whole[name]), name
    plain = build_arch(config)
    export_gguf(plain, config, tok, HF, tmp_path / "plain.gguf", "f16")
    q = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "plain.gguf").tensors}
    assert not np.array_equal(q["blk.0.attn_q.weight"], lazy["blk.0.attn_q.weight"])


def test_model_with_unsupported_settings_is_refused(tok, tmp_path):
    config = tiny_config("llama")
    info = _with_adapter(build_arch(config))
    dora = build_arch(config)
    apply_lora(dora, LoraConfig(rank=4, alpha=8, dora=True, dropout=0.0))
    with pytest.raises(ExportError, match="DoRA"):
        export_adapter_gguf(dora, config, info.adapter_config(), tmp_path / "a.gguf")
    with pytest.raises(ExportError, match="not one of"):
        export_gguf(build_arch(config), config, tok, HF, tmp_path / "x.gguf", "q3_k")
    moe = tiny_config("qwen3_moe", norm_topk_prob=False)
    with pytest.raises(ExportError, match="norm_topk_prob"):
        export_gguf(build_arch(moe), moe, tok, HF, tmp_path / "x.gguf")
    gemma = tiny_config("gemma2", query_pre_attn_scalar=32)
    with pytest.raises(ExportError, match="query_pre_attn_scalar 32"):
        export_gguf(build_arch(gemma), gemma, tok, HF, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_failed_writes_keep_the_old_file(tok, tmp_path, monkeypatch):
    config = tiny_config("mistral")
    model = build_arch(config)
    path = tmp_path / "m.gguf"
    export_gguf(model, config, tok, HF, path, "f16")
    good = path.read_bytes()

    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, config, tok, HF, path, "q8_0", progress=interrupt)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]

    calls = []
    real = gguf.GGUFWriter.write_tensor_data

    def disk_full(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(ExportError, match="disk filled up.*nothing was replaced"):
        export_gguf(model, config, tok, HF, path, "q8_0")
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_too_little_disk_space_is_refused_before_writing(tok, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    config = tiny_config("mistral")
    with pytest.raises(ExportError, match="need .* MB free on .* for the GGUF"):
        export_gguf(build_arch(config), config, tok, HF, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_phi3_longrope_matches_mlx(tok, prompt, skip, tmp_path):
    # Phi-3 128k / 3.5 style scaling; llama.cpp's context (256) exceeds the original (64), so
    # it applies the long factors, as mlx-lm always does.
    long, short = np.linspace(1.0, 4.0, 8).tolist(), np.linspace(1.0, 1.5, 8).tolist()
    scaling = {"type": "longrope", "long_factor": long, "short_factor": short}
    config = tiny_config("phi3", original_max_position_embeddings=64, rope_scaling=scaling)
    model = build_arch(config)
    path = export_gguf(model, config, tok, HF, tmp_path / "m.gguf", "f16")["path"]
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= set(_types(path))
    steps = llama_cpp(path, prompt, N_STEPS, skip)
    assert [s["id"] for s in steps] == mlx_greedy(model, prompt, N_STEPS, skip)
    assert compare(model, prompt, steps, skip)["max_diff"] <= F16_TOL


def test_llama3_rope_scaling_is_written_as_rope_freqs(tok, tmp_path):
    config = tiny_config("llama")
    path = export_gguf(build_arch(config), config, tok, HF, tmp_path / "m.gguf")["path"]
    freqs = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(freqs.data)
    # head_dim 16 -> 8 factors: unscaled at high frequencies, the full factor 8 at low ones
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0
