"""A model as an MLX folder: config.json, model.safetensors and tokenizer files mlx_lm.load reads."""

import json
from pathlib import Path

from mlx.utils import tree_flatten

from macft.atomic import save_safetensors, write_folder
from macft.models import Base, quant


def write_mlx_files(folder: Path, base: Base) -> None:
    """The files into an existing `folder` (the caller makes the folder appear atomically)."""
    folder = Path(folder)
    config = {
        k: v for k, v in base.config.items() if k not in ("quantization", "quantization_config")
    }
    entry = quant.config_entry(quant.quantization_plan(base.model))
    if entry:
        config["quantization"] = entry
        config["quantization_config"] = entry  # the key HF tooling looks for
    save_safetensors(folder / "model.safetensors", dict(tree_flatten(base.model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    hf_tokenizer = getattr(base.tokenizer, "_tokenizer", base.tokenizer)
    hf_tokenizer.save_pretrained(str(folder))


def save_mlx_folder(base: Base, out: Path) -> None:
    """The MLX folder at `out`, built under a temp name and swapped in whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_folder(out, lambda tmp: write_mlx_files(tmp, base))
