"""Several LoRA adapters resident on one frozen base, chosen per row of a batch.

`AdapterBank.install` wraps every linear some adapter touches in a `MultiLoRALinear` that
holds all adapters stacked (slot 0 is the base: zeros). Before each forward pass the caller
sets `bank.rows` to the slot each row of the batch asks for; rows that share a slot take one
matmul, a mixed batch one gathered matmul (mx.gather_mm), so requests for different adapters
and the base run in one batch, and no adapter is ever reloaded.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from macft.errors import ModelError
from macft.lora.layers import base_no_bias, dora_norm, linear_dims


class Rows:
    """The slot each row of the running batch asks for; shared by every MultiLoRALinear."""

    def __init__(self):
        self.slots: list[int] = []

    def set(self, slots: list[int]) -> None:
        self.slots = list(slots)


class MultiLoRALinear(nn.Module):
    """y = base(x) + scale[s] * (x @ A[s]) @ B[s], s the slot of x's row (slot 0: base only).

    Adapters of different ranks are zero-padded to the largest: zero columns add exact zeros.
    A DoRA adapter's row rescaling m / |W + scale (AB)^T| is fixed once its weights are, so it
    is kept as one gain per output (1 for plain LoRA). The arithmetic per row is LoRALinear's,
    so a row answers as `macft chat` does.
    """

    def __init__(self, linear: nn.Module, rows: Rows):
        super().__init__()
        self.linear = linear
        self._rows = rows  # a plain attribute: not a parameter, shared by all layers
        in_dims, out_dims = linear_dims(linear)
        self.lora_a = mx.zeros((1, in_dims, 1))  # (slots, in, rank)
        self.lora_b = mx.zeros((1, 1, out_dims))  # (slots, rank, out)
        # Python floats, as LoRALinear's scale; set past nn.Module so they are no parameter.
        object.__setattr__(self, "scales", [0.0])
        object.__setattr__(self, "dora", [False])  # per slot
        self.gain = mx.ones((1, out_dims))  # (slots, out): DoRA's m / norm, 1 for plain LoRA

    def set_slot(self, slot: int, a, b, scale: float, m: mx.array | None = None) -> None:
        """Put adapter (a (in, r), b (r, out), DoRA's m (out,)) in `slot` (None: no adapter)."""
        in_dims, out_dims = self.lora_a.shape[1], self.lora_b.shape[2]
        rank = max(self.lora_a.shape[2], a.shape[1] if a is not None else 0)
        slots = max(self.lora_a.shape[0], slot + 1)
        # Grow the stacks (more slots, a larger rank) by zero padding, then write the slot.
        la = mx.zeros((slots, in_dims, rank), dtype=self.lora_a.dtype)
        lb = mx.zeros((slots, rank, out_dims), dtype=self.lora_b.dtype)
        n, r = self.lora_a.shape[0], self.lora_a.shape[2]
        la[:n, :, :r] = self.lora_a
        lb[:n, :r, :] = self.lora_b
        la[slot], lb[slot] = 0, 0
        if a is not None:
            la[slot, :, : a.shape[1]] = a.astype(la.dtype)
            lb[slot, : b.shape[0], :] = b.astype(lb.dtype)
        gain = mx.ones((slots, out_dims), dtype=mx.float32)
        gain[:n] = self.gain
        gain[slot] = 1.0
        if m is not None:
            gain[slot] = m.astype(mx.float32) / dora_norm(self.linear, a, b, scale)
        self.lora_a, self.lora_b, self.gain = la, lb, gain
        self.scales.extend([0.0] * (slots - len(self.scales)))
        self.dora.extend([False] * (slots - len(self.dora)))
        self.scales[slot] = scale if a is not None else 0.0
        self.dora[slot] = m is not None

    def __call__(self, x: mx.array) -> mx.array:
        slots = self._rows.slots
        used = set(slots)
        if not slots or used == {0} or all(self.scales[s] == 0.0 for s in used):
            return self.linear(x)  # only the base (or adapters that leave this layer alone)
        dora = any(self.dora[s] for s in used)
        # DoRA rescales W x + the update before the bias; plain LoRA adds to linear(x).
        y = base_no_bias(self.linear, x) if dora else self.linear(x)
        if len(used) == 1:
            s = slots[0]  # one adapter for the whole batch: LoRALinear's own arithmetic
            z = (x @ self.lora_a[s]) @ self.lora_b[s]
            y = y + (self.scales[s] * z).astype(x.dtype)
            gain = self.gain[s]
        else:
            # A mixed batch: each row's A and B gathered by its slot (x is (rows, tokens, in)).
            idx = mx.array(slots, dtype=mx.uint32)
            z = mx.gather_mm(
                mx.gather_mm(x, self.lora_a, rhs_indices=idx), self.lora_b, rhs_indices=idx
            )
            scale = mx.array([self.scales[s] for s in slots], dtype=mx.float32)[:, None, None]
            y = y + (scale * z).astype(x.dtype)
            gain = self.gain[idx][:, None, :]
        if not dora:
            return y
        y = gain.astype(x.dtype) * y
        return y + self.linear.bias if "bias" in self.linear else y


def _is_linear(m) -> bool:
    return isinstance(m, (nn.Linear, nn.QuantizedLinear))


class AdapterBank:
    """The adapters resident on one base model: names to slots, added and removed while serving."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = Rows()
        self.slots: dict[str, int] = {}  # adapter name -> slot (the base is slot 0, unnamed)
        self._layers: dict[str, MultiLoRALinear] = {}  # module path -> its layer

    def _layer(self, path: str, who: str) -> MultiLoRALinear:
        if path in self._layers:
            return self._layers[path]
        modules = dict(self.model.named_modules())
        linear = modules.get(path)
        if not _is_linear(linear):
            raise ModelError(
                f"{who}: its adapters name {path}, which is not a linear layer of this base; "
                "were they trained on another model?"
            )
        layer = MultiLoRALinear(linear, self.rows)
        layer.set_slot(max(self.slots.values(), default=0), None, None, 0.0)  # as many slots
        self.model.update_modules(tree_unflatten([(path, layer)]))
        self._layers[path] = layer
        return layer

    def check(self, weights: dict, who: str) -> dict[str, dict]:
        """Every tensor checked against the base, touching no layer: module path -> its
        lora_a, lora_b (and DoRA's m). Serve checks a run this way when it registers it."""
        pairs: dict[str, dict] = {}
        for key, value in weights.items():
            path, _, leaf = key.rpartition(".")
            if leaf not in ("lora_a", "lora_b", "m") or value.ndim != (1 if leaf == "m" else 2):
                raise ModelError(
                    f"{who}: {key} is not a tensor macft serves (LoRA and DoRA on linear "
                    "layers; mixture-of-experts adapters are not served yet)"
                )
            pairs.setdefault(path, {})[leaf] = value
        for path, ab in pairs.items():
            layer = self._layers.get(path)
            linear = layer.linear if layer else dict(self.model.named_modules()).get(path)
            if not _is_linear(linear) or set(ab) - {"m"} != {"lora_a", "lora_b"}:
                raise ModelError(
                    f"{who}: its adapters name {path}, which is not a linear layer of this "
                    "base; were they trained on another model? Serve runs of one base together"
                )
            in_dims, out_dims = linear_dims(linear)
            a, b = ab["lora_a"], ab["lora_b"]
            m = ab.get("m")
            if (
                a.shape[0] != in_dims
                or b.shape[1] != out_dims
                or a.shape[1] != b.shape[0]
                or (m is not None and m.shape[0] != out_dims)
            ):
                raise ModelError(
                    f"{who}: its adapter {path} is {a.shape[0]}x{b.shape[1]} but the base's "
                    f"layer is {in_dims}x{out_dims}; these adapters belong to another base"
                )
        return pairs

    def add(self, name: str, weights: dict, scale: float, who: str) -> int:
        """Make adapter `name` resident (mlx-lm's tensor names); returns its slot."""
        pairs = self.check(weights, who)  # all or nothing: checked before any layer changes
        slot = next(i for i in range(1, len(self.slots) + 2) if i not in self.slots.values())
        for path, ab in pairs.items():
            self._layer(path, who).set_slot(slot, ab["lora_a"], ab["lora_b"], scale, ab.get("m"))
        for path, layer in self._layers.items():
            if path not in pairs:
                layer.set_slot(slot, None, None, 0.0)  # this adapter leaves the layer alone
        mx.eval(self.model.parameters())
        self.slots[name] = slot
        return slot

    def remove(self, name: str) -> None:
        """Free the adapter's slot (zeroed, reused by the next adapter added)."""
        slot = self.slots.pop(name)
        for layer in self._layers.values():
            layer.set_slot(slot, None, None, 0.0)
        mx.eval(self.model.parameters())
