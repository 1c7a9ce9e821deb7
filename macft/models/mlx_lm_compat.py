"""The one module that reaches into mlx-lm internals, so a new mlx-lm release breaks only here."""

import contextlib
import sys
from functools import partial
from pathlib import Path

import mlx.nn as nn
from mlx_lm import utils as _utils
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch, StopSequences
from mlx_lm.models import activations as _activations
from mlx_lm.models import base as _base
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)

__all__ = [
    "QuantizedSwitchLinear",
    "SwitchLinear",
    "TokenizerWrapper",
    "GenerationBatch",
    "build_model",
    "load_quantized_folder",
    "load_folder_tokenizer",
    "model_classes",
    "model_functions",
    "start_generation",
    "wrap_tokenizer",
]

_DETOKENIZERS = {
    "bpe": BPEStreamingDetokenizer,
    "spm": SPMStreamingDetokenizer,
    "spm_no_space": partial(SPMStreamingDetokenizer, trim_space=False),
}


def model_classes(config: dict):
    """(Model, ModelArgs) for config["model_type"]; ValueError when mlx-lm lacks it."""
    return _utils._get_classes(config)


def build_model(config: dict) -> nn.Module:
    """An uninitialised-looking model: MLX's random init stays lazy until weights replace it."""
    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))


def load_quantized_folder(path: Path):
    """mlx-lm's own loader for folders it wrote (per-layer quantization config included)."""
    return _utils.load_model(Path(path), lazy=False)


def load_folder_tokenizer(path: Path, eos_token_ids=None) -> TokenizerWrapper:
    return _utils.load_tokenizer(Path(path), eos_token_ids=eos_token_ids)


def wrap_tokenizer(hf_tokenizer, detokenizer: str | None, eos_token_ids=None) -> TokenizerWrapper:
    """Wrap an HF tokenizer with the streaming detokenizer that matches its decoder."""
    cls = _DETOKENIZERS.get(detokenizer, NaiveStreamingDetokenizer)
    return TokenizerWrapper(hf_tokenizer, cls, eos_token_ids=eos_token_ids)


def start_generation(model, uid: int, prompt: list[int], sampler, stop_ids, max_tokens: int, cache):
    """One prompt prefilled into `cache` (mlx-lm's continuous batching), as a GenerationBatch
    of one row whose first token is already being computed; running.extend(it) joins a batch."""
    stops = StopSequences([[t] for t in stop_ids])
    batch = PromptProcessingBatch(
        model,
        [uid],
        [cache],
        samplers=[sampler],
        logits_processors=[()],
        stop_sequences=[stops],
        max_tokens=[max_tokens],
    )
    return batch.generate([prompt])


# Functions mlx-lm's model modules import by name; model_functions can swap these.
_SHARED = {
    "scaled_dot_product_attention": _base.scaled_dot_product_attention,
    "swiglu": _activations.swiglu,
}


@contextlib.contextmanager
def model_functions(model, replacements: dict):
    """Swap functions a model's module calls by name, for the duration.

    replacements: name -> (mlx-lm's function -> the one to use instead). A name is swapped
    only where the module holds mlx-lm's shared function under it (not its own variant).
    """
    module = sys.modules.get(type(model).__module__)
    swapped = {}
    for name, make in replacements.items():
        original = getattr(module, name, None)
        if original is not None and original is _SHARED.get(name):
            swapped[name] = original
            setattr(module, name, make(original))
    try:
        yield
    finally:
        for name, original in swapped.items():
            setattr(module, name, original)
