"""LoRA put on a model: which linears (targets, layers), the adapters' names and files, on and off.

Adapters follow mlx-lm's format, so mlx_lm.load(base, adapter_path=run) reads what macft saves.
"""

import contextlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from macft.config.schema import LoraConfig
from macft.errors import ModelError, RecipeError
from macft.lora import moe
from macft.lora.layers import ADAPTER_LEAVES, LoRALinear
from macft.lora.switch import LoRASwitchLinear, is_switch_linear
from macft.models.quant import parameter_count

ATTENTION_HINTS = ("attn", "attention")
MLP_HINTS = ("mlp", "feed_forward", "ffn")
PRESETS = ("attention", "mlp", "all-linear", "experts", "shared-expert")  # the last two: MoE


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


def _num_layers(layers, n_blocks: int) -> int:
    if layers == "all":
        return n_blocks
    if isinstance(layers, int) and not isinstance(layers, bool) and 1 <= layers <= n_blocks:
        return layers
    raise RecipeError(
        f"lora.layers: {layers!r} is not valid for this model with {n_blocks} layers; "
        f"use 'all' or a number from 1 to {n_blocks}"
    )


def _chosen_keys(blocks, config: LoraConfig) -> list[str]:
    """The module keys (relative to a layer) that config's targets, router and dora pick."""
    candidates: list[str] = []
    for block in blocks:
        candidates += [k for k in _layer_linears(block) if k not in candidates]
    groups = moe.key_groups(blocks)
    keys = select_keys(candidates, config.targets, groups)
    if config.router:
        if groups is None or not groups["router"]:
            raise RecipeError(
                "lora.router: this model has no router (it is not a mixture-of-experts model); "
                "set lora.router: false"
            )
        keys += [k for k in groups["router"] if k not in keys]
    if config.dora and groups and any(k in groups["experts"] for k in keys):
        raise RecipeError(
            "lora.dora: DoRA is not available for stacked experts (mlx-lm cannot load it "
            "either); set lora.dora: false or lora.targets: attention"
        )
    return sorted(keys)


def _wrap(block: nn.Module, keys: list[str], config: LoraConfig) -> None:
    """Replace the block's chosen linears by LoRA layers whose adapters alone are trainable."""
    scale = config.alpha / config.rank
    trainable = list(ADAPTER_LEAVES if config.dora else ADAPTER_LEAVES[:2])
    wrapped = []
    for k, m in block.named_modules():
        if k in keys and is_switch_linear(m):
            layer = LoRASwitchLinear(m, config.rank, scale, config.dropout)
        elif k in keys and _is_linear(m):
            layer = LoRALinear(m, config.rank, scale, config.dropout, config.dora)
        else:
            continue
        layer.freeze()
        layer.unfreeze(keys=trainable, recurse=False)
        wrapped.append((k, layer))
    block.update_modules(tree_unflatten(wrapped))


def apply_lora(model: nn.Module, config: LoraConfig | None = None) -> LoraInfo:
    """Freeze the model and wrap the targeted linears of the last `config.layers` blocks.

    `config` defaults to the recipe's defaults. On a mixture-of-experts model the stacked
    experts get one adapter each (LoRASwitchLinear) and the routers stay frozen unless
    `config.router` is set."""
    config = config or LoraConfig()
    blocks = getattr(model, "layers", None)
    if not blocks:
        raise ModelError("this model exposes no transformer layers (model.layers); LoRA needs them")
    if lora_layers(model):
        raise ModelError("LoRA is already applied to this model; load a fresh base to apply it")
    num_layers = _num_layers(config.layers, len(blocks))
    chosen = blocks[len(blocks) - num_layers :]
    keys = _chosen_keys(chosen, config)
    model.freeze()
    for block in chosen:
        _wrap(block, keys, config)
    mx.eval(model.trainable_parameters())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return LoraInfo(
        keys=keys,
        num_layers=num_layers,
        rank=config.rank,
        alpha=float(config.alpha),
        dropout=float(config.dropout),
        dora=config.dora,
        trainable=trainable,
        total=parameter_count(model),
    )


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's LoRA layers (on a mixture of experts also the stacked experts' LoRA)."""
    kinds = (LoRALinear, LoRASwitchLinear)
    return [(p, m) for p, m in model.named_modules() if isinstance(m, kinds)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Swap every LoRA layer for the linear it wraps, then put them back: the base, same weights.

    Swapping (rather than zeroing the scale) also gives the exact base for DoRA, whose learned
    magnitudes rescale the output even when the low-rank update is zero.
    """
    swapped = []
    for _, module in model.named_modules():
        for key, child in module.children().items():
            if isinstance(child, (LoRALinear, LoRASwitchLinear)):
                swapped.append((module, key, child))
            elif isinstance(child, list):
                swapped += [(child, i, c) for i, c in enumerate(child) if isinstance(c, LoRALinear)]
    for owner, key, lora in swapped:
        owner[key] = lora.linear
    try:
        yield len(swapped)
    finally:
        for owner, key, lora in swapped:
            owner[key] = lora


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
