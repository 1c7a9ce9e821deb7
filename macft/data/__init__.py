"""Training and held-out data: JSONL lines checked with file:line errors (jsonl.py), tokenized
through the chat template with loss masks (encode.py), split and cut (dataset.py), batches of
padded or packed rows (batches.py, packing.py), eval cases (heldout.py).
Imports config/, models/ and lora/ (never train/ or later)."""
