"""Quantize weights as they load, describe per-module quantization, and dequantize for float compute."""

from collections import Counter

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from macft.models.mlx_lm_compat import QuantizedSwitchLinear, SwitchLinear

FLOAT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def quantizable(path: str, module: nn.Module, group_size: int, model: nn.Module | None = None):
    """False, or the to_quantized params mlx-lm would use for this module."""
    if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
        return False
    ndim = (
        3 if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)) else 2
    )  # MoE experts: (experts, out, in)
    if module.weight.ndim != ndim or module.weight.shape[-1] % group_size != 0:
        return False  # mx.quantize needs whole groups along the last axis
    predicate = getattr(model, "quant_predicate", None) if model is not None else None
    return predicate(path, module) if predicate is not None else True


def quantize_one(
    weight: mx.array, bits: int, group_size: int
) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize and evaluate one matrix; the caller must hold no other reference to `weight`."""
    q, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    del weight  # only the graph holds the float data now, so eval frees it
    mx.eval(q, scales, biases)
    return q, scales, biases


def quantize_on_load(model: nn.Module, weights: dict, bits: int, group_size: int) -> dict:
    """Replace each quantizable float weight in `weights` (lazy arrays) by its triplet, one at a time.

    Peak memory stays near the quantized size plus one float matrix, since each lazy
    array is read from disk, quantized and dropped before the next. Returns
    {module path: {"group_size", "bits"}} for `apply_quantization`.
    """
    plan = {}
    for path, module in model.named_modules():
        params = quantizable(path, module, group_size, model)
        key = f"{path}.weight"
        if not params or key not in weights or f"{path}.scales" in weights:
            continue
        params = params if isinstance(params, dict) else {}
        b, g = params.get("bits", bits), params.get("group_size", group_size)
        weights[f"{path}.weight"], weights[f"{path}.scales"], weights[f"{path}.biases"] = (
            quantize_one(weights.pop(key), b, g)
        )
        plan[path] = {"group_size": g, "bits": b}
    return plan


def apply_quantization(model: nn.Module, plan: dict) -> None:
    """Swap the listed modules for quantized ones (their lazy random weights are never evaluated)."""
    nn.quantize(model, class_predicate=lambda p, m: dict(plan[p]) if p in plan else False)


def quantization_plan(model: nn.Module) -> dict:
    return {
        p: {"group_size": m.group_size, "bits": m.bits}
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
    }


def config_entry(plan: dict) -> dict | None:
    """config.json "quantization": the common setting plus an entry per module that differs."""
    if not plan:
        return None
    common = Counter((v["group_size"], v["bits"]) for v in plan.values()).most_common(1)[0][0]
    entry = {"group_size": common[0], "bits": common[1]}
    for p, v in sorted(plan.items()):
        if (v["group_size"], v["bits"]) != common:
            entry[p] = dict(v)
    return entry


def float_weight(module: nn.Module, dtype=mx.float32, rows=slice(None)) -> mx.array:
    """A linear's, embedding's or stacked experts' weight (or some of its rows) as floats of
    dtype, dequantized if needed: from scales and biases in dtype, so 16-bit scales do not
    round the result to 16 bits before it is cast (a merge into float32 stays exact)."""
    if "scales" not in module:
        return module.weight[rows].astype(dtype)
    biases = module.get("biases")
    return mx.dequantize(
        module.weight[rows],
        module.scales[rows].astype(dtype),
        None if biases is None else biases[rows].astype(dtype),
        group_size=module.group_size,
        bits=module.bits,
        mode=getattr(module, "mode", "affine"),
    )


def dequantize(model: nn.Module, dtype) -> None:
    """Quantized layers -> plain Linear/Embedding of `dtype`, one layer at a time; other floats cast."""
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.QuantizedLinear):
            w = float_weight(m, dtype)
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            new.weight = w
            if "bias" in m:
                new.bias = m.bias.astype(dtype)
        elif isinstance(m, nn.QuantizedEmbedding):
            w = float_weight(m, dtype)
            new = nn.Embedding(*w.shape)
            new.weight = w
        elif isinstance(m, QuantizedSwitchLinear):
            w = float_weight(m, dtype)
            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
            new.weight = w
            if "bias" in m:
                new.bias = m.bias.astype(dtype)
        else:
            continue
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(path, new)]))
    cast_floats(model, dtype, lambda name: True)


def cast_floats(model: nn.Module, dtype, select) -> None:
    """Cast floating parameters whose name passes `select` (quantized weights are uint32, untouched)."""
    updates = [
        (k, v.astype(dtype))
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype and select(k)
    ]
    if updates:
        model.update(tree_unflatten(updates))
        mx.eval(model.parameters())


def parameter_count(model: nn.Module) -> int:
    """All parameters, quantized weights counted by their logical (unpacked) size."""
    quantized = {
        name: m.bits
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
    }
    total = 0
    for name, v in tree_flatten(model.parameters()):
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if owner not in quantized:
            total += v.size
        elif leaf == "weight":
            total += v.size * 32 // quantized[owner]
        elif leaf not in ("scales", "biases"):  # quantization bookkeeping, not parameters
            total += v.size
    return total


def float32_bytes(model: nn.Module) -> int:
    """Bytes the model would take with every weight as float32."""
    return 4 * parameter_count(model)
