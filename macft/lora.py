"""LoRA / DoRA layers over frozen (quantized or float) linears, stored in mlx-lm's adapter format."""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from macft import moe
from macft.errors import ModelError, RecipeError
from macft.lora_switch import LoRASwitchLinear, is_switch_linear
from macft.models.quant import float_weight

ATTENTION_HINTS = ("attn", "attention")
MLP_HINTS = ("mlp", "feed_forward", "ffn")
PRESETS = ("attention", "mlp", "all-linear", "experts", "shared-expert")  # the last two: MoE
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(in, out) of a float or quantized linear; a quantized weight packs 32 // bits values per word."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ lora_a @ lora_b; with dora, rows rescaled to norm m.

    Parameter names and shapes follow mlx-lm (lora_a (in, r), lora_b (r, out), m (out,)) so
    mlx_lm.load(base, adapter_path=run) reads what macft saves.
    """

    def __init__(
        self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0, dora: bool = False
    ):
        super().__init__()
        in_dims, out_dims = linear_dims(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.dora = dora
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))  # zero: the wrapped layer starts equal to the base
        if dora:
            # DoRA's magnitude: the row norms of W, so that at init the output equals the base.
            self.m = mx.linalg.norm(float_weight(linear).astype(mx.float32), axis=1)

    def _base_no_bias(self, x: mx.array) -> mx.array:
        lin = self.linear
        if isinstance(lin, nn.QuantizedLinear):
            return mx.quantized_matmul(
                x,
                lin.weight,
                lin.scales,
                lin.get("biases"),
                transpose=True,
                group_size=lin.group_size,
                bits=lin.bits,
                mode=lin.mode,
            )
        return x @ lin.weight.T

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        if not self.dora:
            return self.linear(x) + (self.scale * z).astype(x.dtype)
        out = self._base_no_bias(x) + (self.scale * z).astype(x.dtype)
        # Norm of each row of W + scale * (A @ B)^T; no gradient through it, as in DoRA's paper
        # and mlx-lm (it saves memory and keeps the update stable).
        w = float_weight(self.linear).astype(mx.float32)
        adapted = w + (self.scale * self.lora_b.T) @ self.lora_a.T
        denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
        out = (self.m / denom).astype(x.dtype) * out
        if "bias" in self.linear:
            out = out + self.linear.bias
        return out


@dataclass
class LoraInfo:
    keys: list[str]  # module paths relative to a transformer layer, e.g. "self_attn.q_proj"
    num_layers: int
    rank: int
    alpha: float
    dropout: float
    dora: bool
    trainable: int
    total: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapter_config(self) -> dict:
        """The adapter_config.json that mlx-lm's load_adapters reads (scale, not alpha)."""
        return {
            "fine_tune_type": "dora" if self.dora else "lora",
            "num_layers": self.num_layers,
            "lora_parameters": {
                "rank": self.rank,
                "scale": self.scale,
                "dropout": self.dropout,
                "keys": list(self.keys),
            },
        }


def _is_linear(m) -> bool:
    return isinstance(m, (nn.Linear, nn.QuantizedLinear))


def _layer_linears(layer: nn.Module) -> list[str]:
    return [k for k, m in layer.named_modules() if k and (_is_linear(m) or is_switch_linear(m))]


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def select_keys(candidates: list[str], targets, groups: dict | None = None) -> list[str]:
    """Relative module paths chosen by a preset or by explicit names (leaf or dotted suffix).

    `groups` (moe.key_groups) marks an MoE model: its routers are left out of every preset
    (lora.router adds them), `experts` and `shared-expert` pick the stacked and shared experts.
    """
    if isinstance(targets, str) and targets in PRESETS:
        if groups is None and targets in ("experts", "shared-expert"):
            raise RecipeError(
                f"lora.targets: {targets!r} is for mixture-of-experts models and this model has "
                "no experts; use attention, mlp or all-linear"
            )
        routers = set(groups["router"]) if groups else set()
        chosen = moe.preset_keys(targets, candidates, groups) if groups else None
        if chosen is None and targets == "all-linear":
            chosen = [k for k in candidates if k not in routers]
        elif chosen is None:
            hints = ATTENTION_HINTS if targets == "attention" else MLP_HINTS
            chosen = [
                k
                for k in candidates
                if k not in routers and any(h in p for p in k.split(".")[:-1] for h in hints)
            ]
        if not chosen:
            raise RecipeError(
                f"lora.targets: {targets!r} matches no linear layer in this model; "
                f"name them instead, from: {', '.join(candidates)}"
            )
        return chosen
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else targets
    names = [n for n in names if n]
    unknown = [n for n in names if not any(_matches(k, n) for k in candidates)]
    if unknown or not names:
        leaves = sorted({k.rsplit(".", 1)[-1] for k in candidates})
        raise RecipeError(
            f"lora.targets: no linear layer named {', '.join(unknown) or '(empty)'} in this "
            f"model; valid names: {', '.join(leaves)} (or {', '.join(PRESETS)})"
        )
    return [k for k in candidates if any(_matches(k, n) for n in names)]


def count_parameters(model: nn.Module) -> int:
    """All parameters, quantized weights counted by their logical (unpacked) size."""
    quantized = {
        name: m.bits
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        or (is_switch_linear(m) and hasattr(m, "bits"))
    }
    total = 0
    for name, v in tree_flatten(model.parameters()):
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if owner in quantized:
            if leaf == "weight":
                total += v.size * 32 // quantized[owner]
            elif leaf in ("scales", "biases"):
                continue  # quantization bookkeeping, not model parameters
            else:
                total += v.size
        else:
            total += v.size
    return total


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets="all-linear",
    layers="all",
    dora: bool = False,
    router: bool = False,
) -> LoraInfo:
    """Freeze the model and wrap the targeted linears of the last `layers` blocks with LoRA.

    On a mixture-of-experts model the stacked experts get one adapter each (LoRASwitchLinear)
    and the routers stay frozen unless `router` is set."""
    blocks = getattr(model, "layers", None)
    if not blocks:
        raise ModelError("this model exposes no transformer layers (model.layers); LoRA needs them")
    if any(isinstance(m, (LoRALinear, LoRASwitchLinear)) for _, m in model.named_modules()):
        raise ModelError("LoRA is already applied to this model; load a fresh base to apply it")
    n_blocks = len(blocks)
    if layers == "all":
        num_layers = n_blocks
    elif isinstance(layers, int) and not isinstance(layers, bool) and 1 <= layers <= n_blocks:
        num_layers = layers
    else:
        raise RecipeError(
            f"lora.layers: {layers!r} is not valid for this model with {n_blocks} layers; "
            f"use 'all' or a number from 1 to {n_blocks}"
        )
    chosen_blocks = blocks[n_blocks - num_layers :]
    candidates: list[str] = []
    for block in chosen_blocks:
        candidates += [k for k in _layer_linears(block) if k not in candidates]
    groups = moe.key_groups(chosen_blocks)
    keys = select_keys(candidates, targets, groups)
    if router:
        if groups is None or not groups["router"]:
            raise RecipeError(
                "lora.router: this model has no router (it is not a mixture-of-experts model); "
                "set lora.router: false"
            )
        keys += [k for k in groups["router"] if k not in keys]
    keys = sorted(keys)
    if dora and groups and any(k in groups["experts"] for k in keys):
        raise RecipeError(
            "lora.dora: DoRA is not available for stacked experts (mlx-lm cannot load it "
            "either); set lora.dora: false or lora.targets: attention"
        )

    model.freeze()
    scale = alpha / rank
    trainable_leaves = ["lora_a", "lora_b"] + (["m"] if dora else [])
    for block in chosen_blocks:
        wrapped = []
        for k, m in block.named_modules():
            if k in keys and is_switch_linear(m):
                layer = LoRASwitchLinear(m, rank, scale, dropout)
            elif k in keys and _is_linear(m):
                layer = LoRALinear(m, rank, scale, dropout, dora)
            else:
                continue
            layer.freeze()
            layer.unfreeze(keys=trainable_leaves, recurse=False)
            wrapped.append((k, layer))
        block.update_modules(tree_unflatten(wrapped))
    mx.eval(model.trainable_parameters())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return LoraInfo(
        keys=keys,
        num_layers=num_layers,
        rank=rank,
        alpha=float(alpha),
        dropout=float(dropout),
        dora=dora,
        trainable=trainable,
        total=count_parameters(model),
    )


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable adapter tensors by mlx-lm's names (model.layers.N.<key>.lora_a ...)."""
    return dict(tree_flatten(model.trainable_parameters()))


def load_adapter_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Put saved adapter tensors back; every name must be an adapter of this model."""
    own = adapter_weights(model)
    bad = sorted(
        k for k, v in weights.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)
    )
    if bad or set(own) - set(weights):
        raise ModelError(
            "the saved adapters do not fit this model and LoRA setup "
            f"({len(bad)} unknown or mis-shaped, {len(set(own) - set(weights))} missing); "
            "were model or lora settings changed since the run started?"
        )
    model.load_weights(list(weights.items()), strict=False)
