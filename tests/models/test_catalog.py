"""The model catalog: aliases through a fake Hugging Face cache, offline errors, Ollama blobs, Gemma 3 GGUF."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY_CONFIG, Q, close, logits, save_tiny_model_dir, write_gguf
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text

from macft.cli import cli
from macft.errors import ModelError
from macft.models import load_base, resolve_model_path
from macft.models.catalog import CATALOG, lookup


def fake_hf_cache(root, repo, model_dir_fn):
    """A Hugging Face cache laid out as huggingface_hub writes it: refs/main -> snapshots/<sha>."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(sha)
    model_dir_fn(folder / "snapshots" / sha)
    return folder / "snapshots" / sha


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_catalog_entries_are_complete():
    assert {"llama-3.1-8b", "qwen3-8b", "mistral-7b", "gemma-3-4b", "smollm2-135m"} <= set(CATALOG)
    for e in CATALOG.values():
        assert e.hf_repo.count("/") == 1 and e.chat_format in (
            "chatml",
            "llama3",
            "mistral",
            "gemma",
            "phi3",
        )
        billions = e.shape.parameters() / 1e9
        assert 0.8 * e.params < billions < 1.2 * e.params, (e.alias, billions)
    assert lookup("LLaMA-3.1-8B").alias == "llama-3.1-8b"


def test_alias_resolves_to_cached_snapshot(hf_cache):
    entry = CATALOG["llama-3.2-1b"]
    snap = fake_hf_cache(hf_cache, entry.mlx_repo, save_tiny_model_dir)
    assert resolve_model_path("llama-3.2-1b") == snap
    base = load_base("llama-3.2-1b", compute="float32")
    assert base.config["hidden_size"] == TINY_CONFIG["hidden_size"]
    # The original repo serves when only it is cached (SmolLM2-1.7B has no MLX repo listed).
    snap2 = fake_hf_cache(hf_cache, CATALOG["smollm2-1.7b"].hf_repo, save_tiny_model_dir)
    assert resolve_model_path("smollm2-1.7b") == snap2


def test_offline_alias_is_one_clean_line(hf_cache, tmp_path):
    with pytest.raises(ModelError) as e:
        resolve_model_path("qwen3-8b")
    msg = str(e.value)
    assert "\n" not in msg and "mlx-community/Qwen3-8B-4bit" in msg
    assert "hf download mlx-community/Qwen3-8B-4bit" in msg and "HF_HUB_OFFLINE" in msg
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    args = ["train", "--model", "qwen3-8b", "--data", str(data), "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "Error: model qwen3-8b: mlx-community/Qwen3-8B-4bit" in r.output


def fake_ollama(root, name, tag, blob_source):
    digest = "sha256:" + "ab" * 32
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    blob = root / "blobs" / digest.replace(":", "-")
    os.symlink(blob_source, blob)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 1},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return blob


@pytest.mark.real
def test_ollama_manifest_resolves_to_blob(tmp_path, monkeypatch):
    gguf_path = resolve_model_path("smollm2-135m")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    blob = fake_ollama(tmp_path / ".ollama" / "models", "smollm2", "135m", gguf_path)
    assert resolve_model_path("ollama:smollm2:135m") == blob
    base = load_base("ollama:smollm2:135m", compute="quantized")
    assert base.source["kind"] == "gguf" and base.config["num_hidden_layers"] == 30

    other = tmp_path / "elsewhere"
    monkeypatch.setenv("OLLAMA_MODELS", str(other))
    blob2 = fake_ollama(other, "smollm2", "latest", gguf_path)
    assert resolve_model_path("ollama:smollm2") == blob2
    with pytest.raises(ModelError) as e:
        resolve_model_path("ollama:llama3.2")
    msg = str(e.value)
    assert "smollm2:latest" in msg and "ollama pull llama3.2:latest" in msg and "\n" not in msg


def test_ollama_missing_blob_and_empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "none"))
    with pytest.raises(ModelError, match="models there: none; fix: ollama pull qwen3:8b"):
        resolve_model_path("ollama:qwen3:8b")
    fake_ollama(tmp_path / "none", "qwen3", "8b", tmp_path / "gone.gguf")
    with pytest.raises(ModelError, match="blob .* is missing"):
        resolve_model_path("ollama:qwen3:8b")


GEMMA3 = {
    **TINY_CONFIG,
    "model_type": "gemma3_text",
    "head_dim": 16,
    "num_hidden_layers": 7,  # one global layer after six local ones, and one more local
    "sliding_window": 4,
    "sliding_window_pattern": 6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 16,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def test_gguf_gemma3_round_trip(tmp_path):
    mx.random.seed(3)
    args = gemma3_text.ModelArgs.from_dict(GEMMA3)
    model = gemma3_text.Model(args)
    model.sanitize({})  # tied: no lm_head
    # Norm weights away from zero, so a missing "-1" on load would show in the logits.
    norms = [
        (k, mx.random.uniform(-0.5, 0.5, v.shape))
        for k, v in tree_flatten(model.parameters())
        if k.endswith("norm.weight")
    ]
    model.load_weights(norms, strict=False)
    mx.eval(model.parameters())
    # llama.cpp stores Gemma's norms as 1 + w: write a copy that holds them that way.
    stored = gemma3_text.Model(args)
    stored.sanitize({})
    stored.load_weights(
        [
            (k, v + 1 if k.endswith("norm.weight") else v)
            for k, v in tree_flatten(model.parameters())
        ]
    )
    extra = [
        lambda w: w.add_sliding_window(GEMMA3["sliding_window"]),
        lambda w: w.add_rope_freq_base_swa(GEMMA3["rope_local_base_freq"]),
    ]
    path = write_gguf(tmp_path / "g3.gguf", stored, GEMMA3, arch="gemma3",
                      types={"token_embd": Q.Q8_0}, extra=extra)  # fmt: skip
    base = load_base(str(path), bits=8, group_size=32, compute="float32")
    assert base.config["model_type"] == "gemma3_text" and base.config["sliding_window"] == 4
    assert "lm_head" not in base.model
    tokens = mx.array([[5, 70, 200, 33, 9, 120, 64, 250, 17, 3, 44, 90]])
    close(logits(base.model, tokens), logits(model, tokens), 0.995)
    got = base.model.model.layers[0].post_feedforward_layernorm.weight
    np.testing.assert_allclose(
        np.array(got), np.array(model.model.layers[0].post_feedforward_layernorm.weight), atol=1e-6
    )
