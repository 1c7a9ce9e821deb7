"""Merge LoRA / DoRA adapters into float weights and swap the wrapped linears for plain ones."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from macft.errors import ExportError
from macft.lora import LoRALinear
from macft.lora_switch import LoRASwitchLinear
from macft.models import Base, quant
from macft.models.hf import load_folder

DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
REQUANT_GROUP = 64  # mlx-lm's default group size for --quantize


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """LoRA linears, and on a mixture of experts the stacked experts' LoRA."""
    kinds = (LoRALinear, LoRASwitchLinear)
    return [(p, m) for p, m in model.named_modules() if isinstance(m, kinds)]


def merged_weight(layer: LoRALinear, dtype=mx.float32) -> mx.array:
    """W + scale * B^T A^T in float32 (DoRA: each row then rescaled to norm m), cast to dtype.

    The same update LoRALinear applies to its input, written into the weight: mlx-lm stores
    lora_a as (in, r) and lora_b as (r, out), so the (out, in) update is (scale * B^T) @ A^T.
    """
    f32 = mx.float32
    w = quant.float_weight(layer.linear).astype(f32)
    w = w + (layer.scale * layer.lora_b.astype(f32).T) @ layer.lora_a.astype(f32).T
    if layer.dora:
        w = (layer.m.astype(f32) / mx.linalg.norm(w, axis=1))[:, None] * w
    return w.astype(dtype)


def fuse_model(model: nn.Module, dtype, progress=None) -> int:
    """Replace every LoRALinear by an nn.Linear with the merged weight; dequantize the rest to dtype.

    One layer at a time, so peak memory is the quantized model plus the float one being built.
    Returns the number of merged layers; `progress(done, total)` is called after each.
    """
    layers = lora_layers(model)
    if not layers:
        raise ExportError("this model carries no LoRA layers; there is nothing to fuse")
    for done, (path, layer) in enumerate(layers, 1):
        if isinstance(layer, LoRASwitchLinear):
            fused = layer.fused(dtype)  # every expert's W[e] + scale * B[e] @ A[e]
        else:
            w = merged_weight(layer, dtype)
            has_bias = "bias" in layer.linear
            fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
            fused.weight = w
            if has_bias:
                fused.bias = layer.linear.bias.astype(dtype)
        mx.eval(fused.parameters())
        model.update_modules(tree_unflatten([(path, fused)]))
        if progress is not None:
            progress(done, len(layers))
    quant.dequantize(model, dtype)  # embeddings, heads and untouched linears; casts norms too
    model.eval()
    return len(layers)


def requantize(model: nn.Module, bits: int, group_size: int = REQUANT_GROUP) -> int:
    """Quantize the fused float model as mlx-lm would (its quant_predicate respected)."""
    plan = {}
    for path, module in model.named_modules():
        params = quant.quantizable(path, module, group_size, model)
        if params and not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            params = params if isinstance(params, dict) else {}
            plan[path] = {"group_size": params.get("group_size", group_size), "bits": bits}
    quant.apply_quantization(model, plan)  # quantizes the float weights in place
    mx.eval(model.parameters())
    return len(plan)


def float_source(path: Path) -> bool:
    """Does `path` hold unquantized HF/MLX weights (the best thing to merge into)?"""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return not (config.get("quantization") or config.get("quantization_config"))


def load_float_base(path: Path) -> Base:
    """An HF float folder as it is: no quantize-on-load, weights in their own dtype."""
    model, tokenizer, config, source = load_folder(Path(path), bits=None)
    source["compute"] = source["dtype"]
    return Base(model=model, tokenizer=tokenizer, config=config, source=source)


def parameter_count(model: nn.Module) -> int:
    """Logical parameters (quantized weights unpacked), for size estimates."""
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.size * 32 // m.bits + (m.bias.size if "bias" in m else 0)
        elif not m.children():
            total += sum(v.size for _, v in tree_flatten(m.parameters()))
    return total
