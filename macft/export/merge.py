"""A model with its adapters merged, tensor by tensor: the float weights every export writes."""

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from macft.lora.layers import LoRALinear
from macft.lora.switch import LoRASwitchLinear
from macft.models import Base, mlx_lm_compat, quant
from macft.models.hf import load_folder
from macft.models.mlx_lm_compat import QuantizedSwitchLinear, SwitchLinear

DEQUANT_ROWS = 4096  # rows a large quantized matrix is dequantized in, for numpy writers
_NUMPY = {mx.float32: np.float32, mx.float16: np.float16}

# What mlx-lm quantizes in a model: linears, embeddings and stacked experts, float or not yet.
QUANTIZABLE = (
    nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding, SwitchLinear,
    QuantizedSwitchLinear,
)  # fmt: skip

DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
TORCH_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}  # config.json's names
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


class FusedTensor:
    """One tensor of the fused model, computed only when taken.

    take() evaluates it (in the list's dtype, or one asked for); with `release` it then
    empties the source weights it was made from (the model is being consumed by an export),
    so what was read or dequantized for it does not stay in memory beside the next tensor.
    """

    def __init__(self, name: str, build, dtype, sources: list, release: bool, quantized=None):
        self.name, self.build, self.dtype = name, build, dtype
        self.sources, self.release = sources, release
        self.quantized = quantized  # a quantized module this tensor dequantizes, as it is
        self.shape = tuple(build(dtype).shape)  # a lazy graph: nothing is computed

    def take(self, dtype=None) -> mx.array:
        value = self.build(dtype or self.dtype)
        mx.eval(value)
        self._done(value.dtype)
        return value

    def take_numpy(self, dtype=None) -> np.ndarray:
        """take() as numpy, a large dequantized matrix made a block of rows at a time: MLX's
        CPU dequantize holds ~5x its output in temporaries (a 49k x 2k embedding: +1 GB)."""
        dtype = dtype or self.dtype
        if self.quantized is None or self.shape[0] <= DEQUANT_ROWS:
            return np.asarray(self.take(dtype))
        out = np.empty(self.shape, _NUMPY[dtype])
        for start in range(0, self.shape[0], DEQUANT_ROWS):
            rows = quant.float_weight(self.quantized, dtype, slice(start, start + DEQUANT_ROWS))
            out[start : start + rows.shape[0]] = np.asarray(rows)
        self._done(dtype)
        return out

    def _done(self, dtype) -> None:
        if self.release:
            for module, key in self.sources:
                module[key] = mx.zeros((0,), dtype)


def fused_tensors(model: nn.Module, dtype, release: bool = False) -> list[FusedTensor]:
    """The model's tensors with its adapters merged (if it has any) and its quantized weights
    dequantized: every weight a float of dtype, each computed when it is taken.

    A writer that takes, writes and drops them one at a time holds one float matrix beside
    the model, never the whole fused model (an 8B in f16 is ~16 GB); with `release` the model
    itself empties as it goes (a float base read lazily from disk is never whole in memory).
    """
    kinds, done, out = _kinds(model), set(), []
    modules = dict(model.named_modules())
    for name, value in tree_flatten(model.parameters()):
        path = next((p for p in kinds if name.startswith(f"{p}.")), None)
        if path is None:
            owner_path, key = name.rsplit(".", 1)
            owner = modules[owner_path]
            if mx.issubdtype(value.dtype, mx.floating):
                build = lambda d, o=owner, k=key: o[k].astype(d)  # noqa: E731
            else:
                build = lambda d, v=value: v  # noqa: E731
            out.append(FusedTensor(name, build, dtype, [(owner, key)], release))
            continue
        if path in done:
            continue
        done.add(path)
        m = kinds[path]
        lora = isinstance(m, (LoRALinear, LoRASwitchLinear))
        linear = m.linear if lora else m
        if lora:
            build = lambda d, m=m: m.merged_weight(d)  # noqa: E731
        else:
            build = lambda d, m=m: quant.float_weight(m, d)  # noqa: E731
        weight = f"{path}.weight"
        plain = None if lora else m
        out.append(FusedTensor(weight, build, dtype, [(linear, "weight")], release, plain))
        if "bias" in linear:
            bias = lambda d, lin=linear: lin.bias.astype(d)  # noqa: E731
            out.append(FusedTensor(f"{path}.bias", bias, dtype, [(linear, "bias")], release))
    return out


def fused_parameters(model: nn.Module, dtype) -> Iterator[tuple[str, mx.array]]:
    """(name, array) of the fused model, each computed as it is reached (the model stays)."""
    for t in fused_tensors(model, dtype):
        yield t.name, t.take()


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
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(config, dict):
        return False
    return not (config.get("quantization") or config.get("quantization_config"))


def load_float_base(path: Path) -> Base:
    """An HF float folder as it is: no quantize-on-load, weights in their own dtype, each read
    from disk when the merge needs it."""
    model, tokenizer, config, source = load_folder(Path(path), bits=None, lazy=True)
    source["compute"] = source["dtype"]
    return Base(model=model, tokenizer=tokenizer, config=config, source=source)
