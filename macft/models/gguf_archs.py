"""Per-architecture facts for reading GGUF: config from metadata, q/k row layout, norm offsets."""

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from macft.errors import ModelError
from macft.models.shape import check_config


def _f32(x) -> float:
    """GGUF stores float32; 9.999999747e-06 reads back as the 1e-05 it was written from."""
    return float(f"{float(x):.7g}")


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # general.architecture
    model_type: str  # mlx-lm / HF model_type
    # llama.cpp rotates interleaved pairs for `llama`; HF rotates halves, so q/k rows differ.
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by 1+w and llama.cpp stores w+1: subtract on load.
    norm_offset: float = 0.0
    # Arch-specific config keys from metadata: extra(get) -> dict, get(key, default) reads "<arch>.key".
    extra: Callable = field(default=lambda get: {})


def _qwen3_extra(get):
    return {"head_dim": get("attention.key_length")}


def _gemma3_extra(get):
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length") or hidden // heads
    return {
        "head_dim": head_dim,
        # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 3 27B (62 layers).
        "query_pre_attn_scalar": hidden // heads if get("block_count") == 62 else head_dim,
        "sliding_window": get("attention.sliding_window"),
        "rope_local_base_freq": _f32(get("rope.freq_base_swa", 10000.0)),
        "sliding_window_pattern": 6,  # five local layers, then a global one (llama.cpp's too)
    }


ARCHS = {
    a.gguf_arch: a
    for a in (
        Arch("llama", "llama", permute_qk=True),  # Llama 2/3.x, SmolLM, Mistral v0.1-0.3
        Arch("qwen2", "qwen2"),  # q/k/v biases are ordinary tensors
        Arch("qwen3", "qwen3", extra=_qwen3_extra),  # q/k norms map by name
        # Norms stored +1 (q/k norms too); embeddings tied; text-only model of mlx-lm.
        Arch("gemma3", "gemma3_text", norm_offset=1.0, extra=_gemma3_extra),
    )
}


def get_arch(name: str | None, path) -> Arch:
    if name not in ARCHS:
        raise ModelError(
            f"{path}: GGUF architecture {name!r} is not supported (supported: {', '.join(sorted(ARCHS))}); "
            "use an HF/MLX folder of the model instead"
        )
    return ARCHS[name]


GGUF_COUNTS = {  # HF config key: GGUF metadata key (after "<arch>.")
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "max_position_embeddings": "context_length",
    "vocab_size": "vocab_size",
}


def _counts(get, need, meta: dict) -> dict:
    """The model's counts from the metadata, with llama.cpp's defaults for those it may lack."""
    counts = {k: get(g) for k, g in GGUF_COUNTS.items()}
    for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        counts[k] = need(GGUF_COUNTS[k])
    counts["vocab_size"] = counts["vocab_size"] or len(meta.get("tokenizer.ggml.tokens") or [])
    counts["num_key_value_heads"] = counts["num_key_value_heads"] or counts["num_attention_heads"]
    counts["max_position_embeddings"] = counts["max_position_embeddings"] or 4096
    return counts


def config_from_gguf(arch: Arch, meta: dict, tensor_names, path) -> dict:
    """An HF-style config.json dict from `<arch>.*` metadata."""
    prefix = arch.gguf_arch

    def get(key, default=None):
        v = meta.get(f"{prefix}.{key}", default)
        if isinstance(v, list):
            raise ModelError(f"{path}: per-layer {prefix}.{key} is not supported")
        return v

    def need(key):
        v = get(key)
        if v is None:
            raise ModelError(f"{path}: GGUF metadata lacks {prefix}.{key}; the file is incomplete")
        return v

    counts = _counts(get, need, meta)
    # before anything divides by these or builds that many layers
    labels = {k: f"{prefix}.{g}" for k, g in GGUF_COUNTS.items()}
    check_config(counts, path, tensor_names, labels, layers=0)
    config = {
        "model_type": arch.model_type,
        **counts,
        "head_dim": counts["head_dim"] or counts["hidden_size"] // counts["num_attention_heads"],
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    kind = get("rope.scaling.type")
    if kind in ("linear", "yarn") and get("rope.scaling.factor"):
        config["rope_scaling"] = {
            "type": kind,
            "rope_type": kind,
            "factor": _f32(get("rope.scaling.factor")),
        }
        if get("rope.scaling.original_context_length"):
            config["rope_scaling"]["original_max_position_embeddings"] = int(
                get("rope.scaling.original_context_length")
            )
    config.update({k: v for k, v in arch.extra(get).items() if v is not None})
    return config


def llama3_rope_scaling(factors: list[float]) -> dict:
    """HF rope_scaling for a `rope_freqs` tensor (Llama 3.1/3.2 keep low=1, high=4, 8192)."""
    return {
        "rope_type": "llama3",
        "factor": _f32(max(factors)),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def set_rope_factors(model, factors: mx.array, config: dict) -> None:
    """Use the file's exact per-frequency factors, whatever the inferred rope_scaling says."""
    dims = factors.shape[0] * 2
    periods = config["rope_theta"] ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    for layer in getattr(model, "layers", []):
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if rope is not None and hasattr(rope, "_freqs"):
            rope._freqs = periods * factors.astype(mx.float32)


def unpermute_qk(x: mx.array, heads: int) -> mx.array:
    """llama.cpp row order -> HF row order (rows of weight, scales, biases or bias alike)."""
    rows = x.shape[0]
    half = rows // heads // 2
    return x.reshape(heads, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def permute_qk(x: mx.array, heads: int) -> mx.array:
    """HF row order -> llama.cpp row order, as llama.cpp's converter writes `llama` q/k."""
    rows = x.shape[0]
    half = rows // heads // 2
    return x.reshape(heads, 2, half, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")
