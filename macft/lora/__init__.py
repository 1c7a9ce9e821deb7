"""LoRA and DoRA: the layers (layers.py, switch.py for stacked experts, each with its merge),
which linears of a model they wrap (apply.py, moe.py), adapters saved and loaded, on and off.
Imports config/ and models/."""
