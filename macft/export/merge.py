"""A model with its adapters merged: every LoRA layer becomes a plain float linear; re-quantizing."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from macft.errors import ExportError
from macft.lora.apply import lora_layers
from macft.models import Base, quant
from macft.models.hf import load_folder

DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
REQUANT_GROUP = 64  # mlx-lm's default group size for --quantize


def fuse_model(model: nn.Module, dtype, progress=None) -> int:
    """Replace every LoRALinear by an nn.Linear with the merged weight; dequantize the rest to dtype.

    One layer at a time, so peak memory is the quantized model plus the float one being built.
    Returns the number of merged layers; `progress(done, total)` is called after each.
    """
    layers = lora_layers(model)
    if not layers:
        raise ExportError("this model carries no LoRA layers; there is nothing to fuse")
    for done, (path, layer) in enumerate(layers, 1):
        fused = layer.fused(dtype)  # W + scale * B A, for each expert of a stacked layer too
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
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(config, dict):
        return False
    return not (config.get("quantization") or config.get("quantization_config"))


def load_float_base(path: Path) -> Base:
    """An HF float folder as it is: no quantize-on-load, weights in their own dtype."""
    model, tokenizer, config, source = load_folder(Path(path), bits=None)
    source["compute"] = source["dtype"]
    return Base(model=model, tokenizer=tokenizer, config=config, source=source)
