"""A model with its adapters merged, tensor by tensor: the float weights every export writes."""

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from macft.lora.layers import LoRALinear
from macft.lora.switch import LoRASwitchLinear
from macft.models import Base, mlx_lm_compat, quant
from macft.models.hf import load_folder
from macft.models.mlx_lm_compat import QuantizedSwitchLinear, SwitchLinear

# What mlx-lm quantizes in a model: linears, embeddings and stacked experts, float or not yet.
QUANTIZABLE = (
    nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding, SwitchLinear,
    QuantizedSwitchLinear,
)  # fmt: skip

DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
REQUANT_GROUP = 64  # mlx-lm's default group size for --quantize


def _kinds(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> the module whose weights it holds: LoRA layers and quantized modules."""
    modules = model.named_modules()
    lora = {p: m for p, m in modules if isinstance(m, (LoRALinear, LoRASwitchLinear))}
    quantized = {
        p: m
        for p, m in modules
        if "scales" in m and not any(p.startswith(f"{q}.") for q in lora)  # a LoRA's own linear
    }
    return {**lora, **quantized}


def fused_parameters(model: nn.Module, dtype) -> Iterator[tuple[str, mx.array]]:
    """(name, lazy array) of the model with its adapters merged (if it has any) and its
    quantized weights dequantized: every weight a float of dtype.

    Nothing is computed until an array is evaluated, and each is needed once: a writer that
    evaluates, writes and drops them one at a time holds the quantized model plus one float
    matrix, never the whole fused model (an 8B in f16 is ~16 GB).
    """
    kinds, done = _kinds(model), set()
    for name, value in tree_flatten(model.parameters()):
        path = next((p for p in kinds if name.startswith(f"{p}.")), None)
        if path is None:
            floating = mx.issubdtype(value.dtype, mx.floating)
            yield name, value.astype(dtype) if floating else value
            continue
        if path in done:
            continue
        done.add(path)
        m = kinds[path]
        lora = isinstance(m, (LoRALinear, LoRASwitchLinear))
        linear = m.linear if lora else m
        weight = m.merged_weight(dtype) if lora else quant.float_weight(m, dtype)
        yield f"{path}.weight", weight
        if "bias" in linear:
            yield f"{path}.bias", linear.bias.astype(dtype)


def fused_model(model: nn.Module, config: dict, dtype) -> nn.Module:
    """A new float mlx-lm model holding fused_parameters, all of it in memory at once."""
    fused = mlx_lm_compat.build_model(config)
    fused.load_weights(list(fused_parameters(model, dtype)))
    mx.eval(fused.parameters())
    fused.eval()
    return fused


def requantize_plan(model: nn.Module, bits: int, group_size: int = REQUANT_GROUP) -> dict:
    """{module path: {group_size, bits}} of the fused model's weights that mlx-lm would
    quantize (its quant_predicate respected): linears, embeddings, experts; whole groups only."""
    plan, predicate = {}, getattr(model, "quant_predicate", None)
    for path, m in model.named_modules():
        base = m.linear if isinstance(m, (LoRALinear, LoRASwitchLinear)) else m
        if not isinstance(base, QUANTIZABLE) or any(path.startswith(f"{p}.") for p in plan):
            continue
        in_dims = base.weight.shape[-1] * (32 // base.bits if "scales" in base else 1)
        params = predicate(path, base) if predicate is not None else True
        if params and in_dims % group_size == 0:
            params = params if isinstance(params, dict) else {}
            plan[path] = {"group_size": params.get("group_size", group_size), "bits": bits}
    return plan


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
    """An HF float folder as it is: no quantize-on-load, weights in their own dtype, each read
    from disk when the merge needs it."""
    model, tokenizer, config, source = load_folder(Path(path), bits=None, lazy=True)
    source["compute"] = source["dtype"]
    return Base(model=model, tokenizer=tokenizer, config=config, source=source)
