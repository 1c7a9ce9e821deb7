"""LoRA adapters as a GGUF in llama.cpp's adapter format (llama-cli --lora, Ollama ADAPTER)."""

import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from mlx.utils import tree_flatten

from macft.errors import ExportError
from macft.export.gguf.layout import gguf_name, name_table, resolve, strip_prefix
from macft.export.gguf.writer import type_counts, write_file
from macft.lora.layers import LoRALinear
from macft.models.gguf_archs import permute_qk

F32 = GGMLQuantizationType.F32


def _scale_and_dora(adapter_config) -> tuple[float | None, bool]:
    """(scale, dora) from a LoraInfo or an adapter_config.json dict; either may be missing."""
    if adapter_config is None:
        return None, False
    if hasattr(adapter_config, "scale"):
        return float(adapter_config.scale), bool(getattr(adapter_config, "dora", False))
    params = adapter_config.get("lora_parameters", {})
    dora = adapter_config.get("fine_tune_type") == "dora" or bool(adapter_config.get("use_dora"))
    scale = params.get("scale")
    return (float(scale) if scale is not None else None), dora


def adapter_tensors(model, config: dict) -> tuple[str, list, float, int]:
    """(GGUF arch, [(name, getter, shape, F32)], alpha, rank) for every LoRA layer of the model."""
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ExportError("the model carries no LoRA layers; there is no adapter to export")
    known = {f"{p}.lora_a" for p, _ in layers}
    other = [
        n for n, _ in tree_flatten(model.parameters()) if n.endswith(".lora_a") and n not in known
    ]
    if other:  # e.g. LoRA on stacked MoE experts: llama.cpp adapters have no place for it
        raise ExportError(
            f"{other[0].removesuffix('.lora_a')}: this kind of LoRA layer cannot be a GGUF "
            "adapter; export the fused model instead (macft fuse RUN --gguf)"
        )
    if any(m.dora for _, m in layers):
        raise ExportError(
            "DoRA adapters cannot be written as a GGUF LoRA (llama.cpp has no DoRA); "
            "export the fused model instead (macft fuse RUN --gguf)"
        )
    scales = {float(m.scale) for _, m in layers}
    ranks = {int(m.lora_a.shape[1]) for _, m in layers}
    if len(scales) > 1 or len(ranks) > 1:
        raise ExportError(
            "the LoRA layers differ in rank or scale; a GGUF adapter has one alpha for all layers"
        )
    rank, scale = ranks.pop(), scales.pop()
    # The arch, names and q/k permutation of the base GGUF the adapter goes with.
    _, layout, hp = resolve(model, config)
    table = name_table(layout, hp["num_hidden_layers"])
    permute = layout.permute_qk and not hp.get("rope_traditional", False)
    heads = {
        "self_attn.q_proj": hp["num_attention_heads"],
        "self_attn.k_proj": hp.get("num_key_value_heads") or hp["num_attention_heads"],
    }
    out = []
    for path, m in layers:
        path = strip_prefix(path)
        base = gguf_name(table, f"{path}.weight")
        if base is None or m.lora_a.ndim != 2:
            raise ExportError(f"{path}: llama.cpp has no place for a LoRA on this layer")
        n_heads = next((h for k, h in heads.items() if path.endswith(k)), None)

        def get_a(*_, m=m):
            return np.array(m.lora_a.astype(mx.float32).T)  # (rank, in)

        def get_b(*_, m=m, n_heads=n_heads):
            b = m.lora_b.astype(mx.float32).T  # (out, rank), rows in the base weight's order
            if permute and n_heads:
                b = permute_qk(b, n_heads)
            return np.array(b)

        in_dims, out_dims = m.lora_a.shape[0], m.lora_b.shape[1]
        out.append((f"{base}.lora_a", get_a, (rank, in_dims), F32))
        out.append((f"{base}.lora_b", get_b, (out_dims, rank), F32))
    return layout.gguf_arch, out, scale * rank, rank


def export_adapter_gguf(model, config, adapter_config, path, source=None, progress=None) -> dict:
    """Write the model's LoRA layers to `path` as a llama.cpp LoRA adapter GGUF (F32).

    llama.cpp applies W x + (alpha / rank) * B A x, so alpha = macft's scale * rank; for
    arch `llama`, lora_b rows follow the q/k row permutation of the base GGUF.
    Returns {"path", "size", "arch", "tensors", "alpha", "rank", "seconds"}.
    """
    start = time.monotonic()
    scale, dora = _scale_and_dora(adapter_config)
    if dora:
        raise ExportError(
            "DoRA adapters cannot be written as a GGUF LoRA (llama.cpp has no DoRA); "
            "export the fused model instead (macft fuse RUN --gguf)"
        )
    arch, tensors, alpha, rank = adapter_tensors(model, config)
    if scale is not None and abs(scale * rank - alpha) > 1e-6 * max(1.0, abs(alpha)):
        raise ExportError(
            f"adapter_config scale {scale} does not match the layers' scale {alpha / rank}; "
            "the adapter config belongs to another run"
        )
    origin = Path((source or {}).get("path") or "base").stem

    def add_keys(writer):
        writer.add_type("adapter")
        writer.add_name(f"{origin} LoRA (macft)")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))

    size = write_file(Path(path), arch, add_keys, tensors, 0, progress)
    return {
        "path": str(path),
        "size": size,
        "arch": arch,
        "tensors": len(tensors),
        "types": type_counts(tensors),
        "alpha": float(alpha),
        "rank": rank,
        "seconds": time.monotonic() - start,
    }
