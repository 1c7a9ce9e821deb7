"""Where a base model comes from and how it sits in memory.

Reads HF/MLX folders (quantized to 4 bits layer by layer as they load), GGUF files, Ollama's
blobs and catalog aliases; describes model shapes; holds the one module that reaches into
mlx-lm's internals (mlx_lm_compat.py). Imports config/ and the shared helpers only.
"""

from macft.models.load import ALIASES, Base, load_base, resolve_model_path

__all__ = ["ALIASES", "Base", "load_base", "resolve_model_path"]
