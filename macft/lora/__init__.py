"""LoRA and DoRA: the layers (layers.py, switch.py for stacked experts, each with its merge),
which linears of a model they wrap (apply.py, moe.py), adapters saved and loaded, on and off,
and several adapters resident on one base, chosen per row of a batch (multi.py).
Imports config/ and models/."""
