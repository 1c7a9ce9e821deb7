"""Exports of a run: adapters merged (merge.py), written as an MLX folder, PEFT, GGUF (gguf/)
and an Ollama Modelfile (ollama.py), all staged and renamed into place together (staging.py);
the fuse command (fuse.py, outputs.py); each export then compared with the adapters
(fidelity.py, GGUF files through llama.cpp: llamacpp.py). Imports runs/ and everything before it."""

# Held-out examples the fidelity check compares on by default (here, so the command line
# names it without loading MLX): seconds on a Mac, enough to see a lost fine-tune.
CHECK_EXAMPLES = 8
