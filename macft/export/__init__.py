"""Exports of a run: adapters merged (merge.py), written as an MLX folder, PEFT, GGUF (gguf/)
and an Ollama Modelfile (ollama.py), all staged and renamed into place together (staging.py);
the fuse command (fuse.py, outputs.py). Imports runs/ and everything before it."""
