"""Per architecture: GGUF tensor names and layouts of mlx-lm weights, and the <arch>.* metadata keys."""

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.errors import ExportError
from macft.export.merge import fused_tensors
from macft.models.gguf_archs import permute_qk

# mlx-lm's stacked experts (SwitchGLU) -> llama.cpp's merged expert tensors.
EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


@dataclass(frozen=True)
class Layout:
    gguf_arch: str
    # llama.cpp rotates interleaved pairs for `llama`, HF rotates halves: q/k rows are permuted.
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by 1+w; llama.cpp stores w+1.
    norm_offset: float = 0.0
    meta: Callable = field(default=lambda hp: {})  # hp -> {"key": value} under "<arch>."


def _moe(hp: dict) -> dict:
    n = hp.get("num_local_experts") or hp.get("num_experts") or 0
    if not n:
        return {}
    out = {"expert_count": int(n), "expert_used_count": int(hp["num_experts_per_tok"])}
    if hp.get("moe_intermediate_size"):
        out["expert_feed_forward_length"] = int(hp["moe_intermediate_size"])
    return out


def _gemma2(hp: dict) -> dict:
    return {
        "attn_logit_softcapping": float(hp.get("attn_logit_softcapping") or 0.0),
        "final_logit_softcapping": float(hp.get("final_logit_softcapping") or 0.0),
        "attention.sliding_window": int(hp.get("sliding_window") or 4096),
    }


def _gemma3(hp: dict) -> dict:
    pattern = hp.get("sliding_window_pattern", 6)
    if pattern != 6:
        raise ExportError(
            f"gemma3 with sliding_window_pattern {pattern}: llama.cpp fixes it at 6 (five local "
            "layers, then a global one), so the GGUF would compute another model"
        )
    return {
        "attention.sliding_window": int(hp.get("sliding_window") or 512),
        "rope.freq_base_swa": float(hp.get("rope_local_base_freq", 10000.0)),
    }


def _phi3(hp: dict) -> dict:
    head_dim = hp["hidden_size"] // hp["num_attention_heads"]
    out = {"rope.dimension_count": int(head_dim * hp.get("partial_rotary_factor", 1.0))}
    if hp.get("sliding_window"):
        out["attention.sliding_window"] = int(hp["sliding_window"])
    scaling = hp.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type")) in ("longrope", "su"):
        # Phi-3 128k / 3.5: the factor tensors carry the scaling; these keys size it.
        orig = int(hp.get("original_max_position_embeddings") or 4096)
        ratio = int(hp.get("max_position_embeddings") or orig) / orig
        attn = math.sqrt(1 + math.log(ratio) / math.log(orig)) if ratio > 1 else 1.0
        out["rope.scaling.attn_factor"] = float(scaling.get("long_mscale") or attn)
        out["rope.scaling.original_context_length"] = orig
    return out


def _qwen3moe(hp: dict) -> dict:
    if not hp.get("norm_topk_prob", True):
        raise ExportError(
            "qwen3_moe with norm_topk_prob false: llama.cpp always renormalizes the chosen "
            "experts' weights, so the GGUF would compute another model"
        )
    return _moe(hp)


def longrope_factors(hp: dict) -> dict:
    """Phi-3's per-frequency rope factors as the F32 tensors llama.cpp reads ({} if none)."""
    scaling = hp.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type")) not in ("longrope", "su"):
        return {}
    return {
        f"rope_factors_{k}.weight": np.array(scaling[f"{k}_factor"], dtype=np.float32)
        for k in ("long", "short")
    }


LAYOUTS = {
    "llama": Layout("llama", permute_qk=True),  # Llama 2/3.x, SmolLM, TinyLlama
    "mistral": Layout("llama", permute_qk=True),  # Mistral v0.1-0.3 is llama in llama.cpp
    "mixtral": Layout("llama", permute_qk=True, meta=_moe),
    "qwen2": Layout("qwen2"),
    "qwen3": Layout("qwen3"),
    "qwen3_moe": Layout("qwen3moe", meta=_qwen3moe),
    "gemma2": Layout("gemma2", norm_offset=1.0, meta=_gemma2),
    "gemma3_text": Layout("gemma3", norm_offset=1.0, meta=_gemma3),
    "phi3": Layout("phi3", meta=_phi3),
}


def layout_for(config: dict) -> Layout:
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        raise ExportError(
            f"GGUF export does not support model_type {model_type!r} (supported: "
            f"{', '.join(sorted(LAYOUTS))}); export the MLX folder instead (macft fuse without --gguf)"
        )
    return LAYOUTS[model_type]


def hparams(model: nn.Module, config: dict) -> dict:
    """config.json merged with the model's resolved ModelArgs (the defaults mlx-lm filled in)."""
    args = getattr(model, "args", None)
    resolved = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {}
    return {**config, **{k: v for k, v in resolved.items() if v is not None}}


def head_dim(hp: dict) -> int:
    return int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def check_attention_scale(hp: dict, layout: Layout) -> None:
    """Gemma scales queries by query_pre_attn_scalar; llama.cpp uses head_dim (hidden/heads for 27B)."""
    scalar = hp.get("query_pre_attn_scalar")
    if layout.norm_offset == 0.0 or scalar is None:
        return
    allowed = {head_dim(hp)}
    if hp["num_hidden_layers"] in (46, 62):  # Gemma 2 27B and Gemma 3 27B
        allowed.add(hp["hidden_size"] // hp["num_attention_heads"])
    if int(scalar) not in allowed:
        raise ExportError(
            f"{hp['model_type']} with query_pre_attn_scalar {scalar}: llama.cpp scales attention "
            f"by head_dim {head_dim(hp)} for this model size, so the GGUF would compute another model"
        )


def resolve(model: nn.Module, config: dict) -> tuple[nn.Module, Layout, dict]:
    """(text model, layout, hyperparameters) of an mlx-lm model and its config.json dict."""
    if config.get("model_type") == "gemma3" and "text_config" in config:
        config = {**config["text_config"], "model_type": "gemma3_text"}
        model = getattr(model, "language_model", model)
    layout = layout_for(config)
    hp = hparams(model, config)
    check_attention_scale(hp, layout)
    return model, layout, hp


def metadata(hp: dict, layout: Layout, n_vocab: int) -> dict:
    """<arch>.* keys (without the prefix) -> values: ints, floats or strings."""
    dims = head_dim(hp)
    meta = {
        "vocab_size": n_vocab,
        "context_length": int(hp.get("max_position_embeddings") or 4096),
        "embedding_length": int(hp["hidden_size"]),
        "block_count": int(hp["num_hidden_layers"]),
        "feed_forward_length": int(hp["intermediate_size"]),
        "attention.head_count": int(hp["num_attention_heads"]),
        "attention.head_count_kv": int(hp.get("num_key_value_heads") or hp["num_attention_heads"]),
        "attention.layer_norm_rms_epsilon": float(hp.get("rms_norm_eps", 1e-5)),
        "rope.freq_base": float(hp.get("rope_theta", 10000.0)),
        "rope.dimension_count": dims,
        "attention.key_length": dims,
        "attention.value_length": dims,
    }
    scaling = hp.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("linear", "yarn") and scaling.get("factor"):
        meta["rope.scaling.type"] = kind
        meta["rope.scaling.factor"] = float(scaling["factor"])
        if scaling.get("original_max_position_embeddings"):
            orig = int(scaling["original_max_position_embeddings"])
            meta["rope.scaling.original_context_length"] = orig
    elif kind not in (None, "default", "llama3", "longrope", "su") or (
        kind in ("longrope", "su") and layout.gguf_arch != "phi3"
    ):
        raise ExportError(
            f"rope_scaling type {kind!r} cannot be written to GGUF by macft (supported: linear, "
            "yarn, llama3, and longrope for phi3)"
        )
    meta.update(layout.meta(hp))
    return meta


def llama3_rope_factors(hp: dict) -> np.ndarray | None:
    """Llama 3.1+ rope scaling as llama.cpp takes it: one divisor per frequency (rope_freqs)."""
    scaling = hp.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return None
    dims = head_dim(hp)
    factor = float(scaling["factor"])
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * hp.get("rope_theta", 10000.0) ** (i / dims)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_name(table, name: str) -> str | None:
    module, leaf = name.rsplit(".", 1)
    parts = module.split(".")
    if "switch_mlp" in parts and parts[-1] in EXPERTS:
        layer = parts[parts.index("layers") + 1]
        return f"blk.{layer}.{EXPERTS[parts[-1]]}.{leaf}"
    base = table.get_name(module)
    return f"{base}.{leaf}" if base else None


def name_table(layout: Layout, n_layers: int):
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == layout.gguf_arch)
    return gguf.get_tensor_name_map(arch, n_layers)


def strip_prefix(name: str) -> str:
    # mlx-lm's multimodal Gemma 3 wraps the text model in `language_model`
    return name.removeprefix("language_model.")


def model_tensors(
    model: nn.Module, hp: dict, layout: Layout, consume: bool = False
) -> Iterator[tuple[str, Callable]]:
    """(GGUF name, () -> float32 numpy in llama.cpp's layout, shape) in the model's order.

    Adapters are merged as each tensor is got; with `consume` the model empties as they are
    (export/merge.py's FusedTensor), so memory holds one float matrix beside what is left."""
    table = name_table(layout, hp["num_hidden_layers"])
    heads = {
        "self_attn.q_proj": hp["num_attention_heads"],
        "self_attn.k_proj": hp.get("num_key_value_heads") or hp["num_attention_heads"],
    }
    permute = layout.permute_qk and not hp.get("rope_traditional", False)
    for tensor in fused_tensors(model, mx.float32, release=consume):
        name = strip_prefix(tensor.name)
        gname = gguf_name(table, name)
        if gname is None:
            raise ExportError(
                f"{name}: no GGUF tensor name for this {layout.gguf_arch} weight; the model has "
                "parts llama.cpp does not know, so it cannot be exported to GGUF"
            )
        module = name.rsplit(".", 1)[0]
        n_heads = next((h for k, h in heads.items() if module.endswith(k)), None)

        def get(dtype=mx.float32, tensor=tensor, n_heads=n_heads, name=name):
            offset = layout.norm_offset and name.endswith("norm.weight")
            if (permute and n_heads) or offset:
                dtype = mx.float32
            x = tensor.take_numpy(dtype)  # float16 for an F16 tensor: no float32 copy of it
            if permute and n_heads:
                x = permute_qk(x, n_heads)
            if offset:
                x = x + layout.norm_offset
            return x

        yield gname, get, tensor.shape
