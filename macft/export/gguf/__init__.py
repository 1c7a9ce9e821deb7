"""GGUF files llama.cpp and Ollama load: tensor names and layouts per architecture (layout.py),
types and quantization (quant.py, kquant.py), the vocabulary (vocab.py), the file (writer.py)
and LoRA adapters (adapter.py)."""

# The GGUF types `macft fuse --quant` writes (here, so the command line names them without
# loading the writer).
QTYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
