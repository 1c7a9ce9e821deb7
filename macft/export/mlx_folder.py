"""A model as an MLX folder: config.json, model*.safetensors and tokenizer files mlx_lm.load reads.

Weights are written in shards of about SHARD_BYTES, each evaluated, saved and dropped before the
next: with fused_parameters' lazy arrays the whole fused model never sits in memory at once.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from macft.atomic import save_safetensors, write_folder
from macft.export.merge import fused_tensors, requantize_plan
from macft.models import Base, quant

SHARD_BYTES = 1 << 30


def _shards(folder: Path, params: Iterable, plan: dict, progress, total: int) -> list[dict]:
    """Write params (quantizing the weights in plan) to shard files; their {name: bytes}."""
    written, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            save_safetensors(folder / f"shard-{len(written):05d}.safetensors", current)
            written.append({k: v.nbytes for k, v in current.items()})
            current, size = {}, 0

    for done, (name, value) in enumerate(params, 1):
        module, leaf = name.rsplit(".", 1)
        arrays = {name: value}
        if leaf == "weight" and module in plan:
            q = mx.quantize(value, plan[module]["group_size"], plan[module]["bits"])
            arrays = dict(zip((name, f"{module}.scales", f"{module}.biases"), q, strict=True))
        mx.eval(arrays)
        current.update(arrays)
        size += sum(v.nbytes for v in arrays.values())
        if size >= SHARD_BYTES:
            flush()
        if progress is not None:
            progress(done, total)
    flush()
    return written


def _name_shards(folder: Path, written: list[dict]) -> None:
    """mlx-lm's and HF's names: model.safetensors, or model-0000k-of-0000n + an index."""
    n = len(written)
    if n == 1:
        (folder / "shard-00000.safetensors").rename(folder / "model.safetensors")
        return
    weight_map = {}
    for k, sizes in enumerate(written):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (folder / f"shard-{k:05d}.safetensors").rename(folder / name)
        weight_map.update(dict.fromkeys(sizes, name))
    total = sum(sum(s.values()) for s in written)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_mlx_files(
    folder: Path, params: Iterable, count: int, config: dict, tokenizer, quantized: dict,
    plan=None, progress=None,
) -> None:  # fmt: skip
    """Weights (those in plan quantized as they go), config.json and tokenizer files into an
    existing folder (the caller makes the folder appear atomically). `quantized` says which
    weights are quantized in the output, and how: config.json's quantization entry."""
    folder = Path(folder)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    entry = quant.config_entry(quantized)
    if entry:
        config["quantization"] = entry
        config["quantization_config"] = entry  # the key HF tooling looks for
    _name_shards(folder, _shards(folder, params, plan or {}, progress, count))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    getattr(tokenizer, "_tokenizer", tokenizer).save_pretrained(str(folder))


def write_fused(
    folder: Path, base: Base, dtype, bits=None, progress=None, consume: bool = False
) -> int:
    """The base with its adapters merged, weights of dtype (or re-quantized to bits), one
    tensor at a time (`consume`: the model empties as it goes); how many tensors."""
    plan = requantize_plan(base.model, bits) if bits else {}
    tensors = fused_tensors(base.model, dtype, release=consume)
    params = ((t.name, t.take()) for t in tensors)
    write_mlx_files(folder, params, len(tensors), base.config, base.tokenizer, plan, plan, progress)
    return len(tensors) + 2 * len(plan)


def save_mlx_folder(base: Base, out: Path) -> None:
    """A base (quantized or not) as an MLX folder at `out`, built under a temp name."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flat = tree_flatten(base.model.parameters())
    quantized = quant.quantization_plan(base.model)
    write_folder(
        out,
        lambda tmp: write_mlx_files(tmp, flat, len(flat), base.config, base.tokenizer, quantized),
    )
