"""A run's adapters as a PEFT folder (adapter_config.json + adapter_model.safetensors, HF names)."""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from macft.errors import ExportError
from macft.lora.apply import lora_layers

PREFIX = "base_model.model."  # what PeftModel puts before the HF module path
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def peft_tensors(model: nn.Module) -> dict[str, mx.array]:
    """PEFT's names and layouts: lora_A (r, in), lora_B (out, r), DoRA's magnitude (out,).

    mlx-lm module paths are the HF ones (also for GGUF bases: macft undoes llama.cpp's q/k row
    order when it loads them), so only the prefix and the transposes change.
    """
    out = {}
    for path, layer in lora_layers(model):
        name = PREFIX + path
        out[f"{name}.lora_A.weight"] = layer.lora_a.T
        out[f"{name}.lora_B.weight"] = layer.lora_b.T
        if layer.dora:
            out[f"{name}.lora_magnitude_vector"] = layer.m
    return out


def peft_config(model: nn.Module, base_name: str, dropout: float = 0.0) -> dict:
    """adapter_config.json: r, lora_alpha = scale * r (PEFT scales by alpha / r), targets, layers."""
    layers = lora_layers(model)
    if not layers:
        raise ExportError("this model carries no LoRA layers; there is no adapter to export")
    ranks = {m.lora_a.shape[1] for _, m in layers}
    scales = {float(m.scale) for _, m in layers}
    if len(ranks) != 1 or len(scales) != 1:
        raise ExportError(
            f"the adapters mix ranks {sorted(ranks)} or scales {sorted(scales)}; "
            "a PEFT folder holds one rank and alpha"
        )
    (rank,), (scale,) = ranks, scales
    keys, indices = set(), set()
    for path, _ in layers:
        m = _LAYER.search(path)
        if m is None:
            raise ExportError(f"adapter on {path}, outside the transformer layers; PEFT needs them")
        indices.add(int(m[1]))
        keys.add(m[2])
    n_layers = len(getattr(model, "layers", None) or [])
    partial = len(indices) < n_layers
    alpha = scale * rank
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "r": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(dropout),
        "target_modules": sorted(keys),
        "layers_to_transform": sorted(indices) if partial else None,
        "layers_pattern": "layers" if partial else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": any(m.dora for _, m in layers),
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_peft(folder: Path, model: nn.Module, base_name: str, dropout: float = 0.0) -> dict:
    """Write the two files into `folder` (the caller makes the folder appear atomically)."""
    config = peft_config(model, base_name, dropout)
    tensors = peft_tensors(model)
    mx.save_safetensors(
        str(Path(folder) / "adapter_model.safetensors"), tensors, metadata={"format": "pt"}
    )
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"tensors": len(tensors), "config": config}
