"""macft: LoRA / QLoRA fine-tuning of open LLMs on Apple Silicon with MLX."""

import os

# transformers warns about missing PyTorch on import; macft never needs it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
