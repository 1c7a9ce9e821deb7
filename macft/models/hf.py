"""Load an HF or mlx-lm model folder, quantizing float weights layer by layer as they load."""

import json
import struct
from pathlib import Path

import mlx.core as mx

from macft.errors import ModelError
from macft.models import mlx_lm_compat, quant
from macft.models.shape import check_config

FOLDER_NEEDS = "an HF/MLX model folder needs config.json, *.safetensors and tokenizer files"


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return shown or "nothing"


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("model*.safetensors")) or sorted(
        p for p in path.glob("*.safetensors") if "adapter" not in p.name
    )
    if not files:
        raise ModelError(
            f"{path}: no *.safetensors weights (found: {_listing(path)}); {FOLDER_NEEDS}"
        )
    return files


def check_safetensors(file: Path) -> list[str]:
    """A truncated download passes mx.load's lazy open and fails mid-training; catch it here.
    Returns the tensor names its header lists."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError
            header = json.loads(f.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (ValueError, struct.error, KeyError, TypeError, AttributeError, RecursionError):
        raise ModelError(f"{file}: not a readable safetensors file; download it again") from None
    if 8 + n + end > size:
        raise ModelError(
            f"{file}: truncated ({size:,} of {8 + n + end:,} bytes); download the model again"
        )
    return [k for k in header if k != "__metadata__"]


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{path}: no config.json (found: {_listing(path)}); {FOLDER_NEEDS}")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, 5,000-digit numbers, nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        why = "a number of thousands of digits" if "int_max_str_digits" in why else why
        raise ModelError(f"{cfg}: not valid JSON ({why}); fix or replace the file") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg}: not a JSON object of model settings; fix or replace the file")
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _tokenizer(path: Path, config: dict):
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{path}: no tokenizer files (found: {_listing(path)}); copy tokenizer.json and "
            "tokenizer_config.json from the model's repo into this folder"
        )
    try:
        return mlx_lm_compat.load_folder_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many kinds here, some over several lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(
            f"{path}: cannot load the tokenizer ({type(e).__name__}: {first}); "
            "the folder needs tokenizer.json or tokenizer.model with tokenizer_config.json"
        ) from None


def _source_dtype(weights: dict) -> str:
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    return str(max(set(floats), key=floats.count)).replace("mlx.core.", "") if floats else "unknown"


def load_folder(path: Path, bits: int | None, group_size: int = 64, lazy: bool = False):
    """-> (model, tokenizer, config, source); bits=None keeps a float folder's weights as they
    are, and with lazy=True unread: each is read from disk when first used (fuse reads each
    once, so a float base never sits in memory whole)."""
    config = read_config(path)
    files = weight_files(path)
    names = [name for f in files for name in check_safetensors(f)]
    check_config(config, path / "config.json", names)
    if "model_type" not in config:
        raise ModelError(f"{path}/config.json: no model_type; is this an HF causal LM folder?")
    try:
        mlx_lm_compat.model_classes(config)
    except ValueError:
        raise ModelError(
            f"{path}: model_type {config['model_type']!r} is not supported by the installed mlx-lm; "
            "pip install -U mlx-lm, or pick a supported model"
        ) from None

    if config.get("quantization") or config.get("quantization_config"):
        # Already quantized (MLX, or AWQ/GPTQ/... that mlx-lm converts): its loader knows the layouts.
        try:
            model, config = mlx_lm_compat.load_quantized_folder(path)
        except (ValueError, RuntimeError) as e:
            raise ModelError(
                f"{path}: cannot load the MLX weights ({e}); the folder is damaged"
            ) from None
        source = {"kind": "mlx", "path": str(path), "quantization": config.get("quantization")}
        return model, _tokenizer(path, config), config, source

    try:
        model = mlx_lm_compat.build_model(config)
    except (ValueError, TypeError, KeyError) as e:  # a key missing or of the wrong kind
        raise ModelError(
            f"{path}/config.json: mlx-lm cannot build {config['model_type']} from it "
            f"({type(e).__name__}: {str(e)[:200]}); fix or replace the file"
        ) from None
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))  # lazy: nothing is read until evaluated
    dtype = _source_dtype(weights)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    plan = quant.quantize_on_load(model, weights, bits, group_size) if bits else {}
    quant.apply_quantization(model, plan)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelError(f"{path}: weights do not match config.json ({e})") from None
    del weights
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    config = dict(config)
    if plan:
        config["quantization"] = quant.config_entry(plan)
    source = {"kind": "hf", "path": str(path), "dtype": dtype}
    return model, _tokenizer(path, config), config, source
