"""Using a fine-tune: chat sessions (chat.py) and the chat command's loop (repl.py), eval of
base vs fine-tune (evaluation.py) and its arithmetic (scoring.py), and serving many
fine-tunes of one base over an OpenAI-compatible API (serve/).
Imports runs/ (a run's model), train/ (validation loss) and what comes before."""
