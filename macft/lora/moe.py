"""Mixture-of-experts structure: which modules are the experts, the shared expert and the routers."""

from dataclasses import dataclass

import mlx.nn as nn

from macft.errors import RecipeError
from macft.lora.switch import LoRASwitchLinear, is_switch_linear

ROUTER_NAMES = ("gate", "router")  # mlx-lm's name for the linear that scores the experts
SHARED_NAMES = ("shared_expert", "shared_experts")
# Collapse: the busiest k experts of a layer (k = experts per token) take more than this share
# of its routed tokens. Balanced routing gives them k / experts; a layer with few experts
# (k / experts near 1/2) is judged against twice its balanced share, at most 90%.
COLLAPSE_SHARE = 0.5


@dataclass
class MoeBlock:
    """One sparse MoE block of a transformer layer, as mlx-lm builds it."""

    path: str  # relative to the layer, e.g. "mlp" or "block_sparse_moe"
    module: nn.Module
    experts: str  # child holding the stacked experts, e.g. "switch_mlp"
    router: str  # child scoring the experts, e.g. "gate"
    num_experts: int
    shared: str | None = None  # an always-active shared expert (Qwen1.5/2-MoE)
    shared_gate: str | None = None  # its sigmoid gate, a router too

    def key(self, child: str) -> str:
        return f"{self.path}.{child}" if self.path else child


def _is_switch(m) -> bool:
    return is_switch_linear(m) or isinstance(m, LoRASwitchLinear)


def _switch_children(m: nn.Module) -> list[str]:
    return [k for k, c in m.children().items() if isinstance(c, nn.Module) and _is_switch(c)]


def _num_experts(m: nn.Module) -> int:
    lin = next(c for c in m.children().values() if isinstance(c, nn.Module) and _is_switch(c))
    return lin.num_experts if isinstance(lin, LoRASwitchLinear) else lin.weight.shape[0]


def find_blocks(layer: nn.Module) -> list[MoeBlock]:
    """The MoE blocks of one transformer layer (none in a dense layer)."""
    blocks = []
    for path, m in layer.named_modules():
        children = {k: c for k, c in m.children().items() if isinstance(c, nn.Module)}
        experts = [k for k, c in children.items() if _switch_children(c)]
        routers = [k for k in ROUTER_NAMES if k in children]
        if not experts or not routers:
            continue
        shared = next((k for k in SHARED_NAMES if k in children), None)
        shared_gate = f"{shared}_gate" if shared and f"{shared}_gate" in children else None
        blocks.append(
            MoeBlock(
                path,
                m,
                experts[0],
                routers[0],
                _num_experts(children[experts[0]]),
                shared,
                shared_gate,
            )  # fmt: skip
        )
    return blocks


def is_moe(model: nn.Module) -> bool:
    return any(find_blocks(layer) for layer in getattr(model, "layers", None) or [])


def key_groups(layers) -> dict[str, list[str]] | None:
    """Module keys (relative to a layer) of the experts, shared experts and routers; None if dense."""
    groups: dict[str, list[str]] = {"experts": [], "shared": [], "router": []}
    found = False
    for layer in layers:
        for b in find_blocks(layer):
            found = True
            ex = b.module[b.experts]
            add = {"experts": [b.key(f"{b.experts}.{k}") for k in _switch_children(ex)]}
            add["router"] = [b.key(b.router)] + ([b.key(b.shared_gate)] if b.shared_gate else [])
            if b.shared:
                shared = b.module[b.shared]
                add["shared"] = [
                    b.key(f"{b.shared}.{k}")
                    for k, m in shared.named_modules()
                    if k and isinstance(m, (nn.Linear, nn.QuantizedLinear))
                ]
            for g, keys in add.items():
                groups[g] += [k for k in keys if k not in groups[g]]
    return groups if found else None


def preset_keys(targets: str, candidates: list[str], groups: dict) -> list[str] | None:
    """Keys for an MoE-only preset (experts, shared-expert); None for the shared presets."""
    if targets == "experts":
        return [k for k in candidates if k in groups["experts"]]
    if targets == "shared-expert":
        if not groups["shared"]:
            raise RecipeError(
                "lora.targets: 'shared-expert': this model has no shared expert (Qwen1.5/2-MoE "
                "style models have one); use experts or attention"
            )
        return [k for k in candidates if k in groups["shared"]]
    return None


def collapse_threshold(num_experts: int, top_k: int) -> float:
    return max(COLLAPSE_SHARE, min(0.9, 2 * top_k / num_experts))


def router_trained(model: nn.Module) -> bool:
    """Does any router of the model carry trainable parameters (LoRA on the gate)?"""
    for layer in getattr(model, "layers", None) or []:
        for b in find_blocks(layer):
            if any(True for _ in _flat(b.module[b.router].trainable_parameters())):
                return True
    return False


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
