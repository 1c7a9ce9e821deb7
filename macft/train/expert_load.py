"""Expert load while training: tokens per expert per layer, the collapse warning, the aux loss."""

import contextlib
import functools

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.errors import RecipeError
from macft.lora.moe import collapse_threshold, find_blocks, router_trained
from macft.models.patching import swapped_classes

# Modules being watched -> (tracker, layer index). Looked up by the swapped classes' calls.
_HOOKS: dict[int, tuple["ExpertTracker", int]] = {}


@functools.cache
def _routed_class(cls):
    call = cls.__call__

    def __call__(self, x, indices, *args, **kwargs):
        hook = _HOOKS.get(id(self))
        if hook is not None and self.training:
            hook[0]._routed(hook[1], indices)
        return call(self, x, indices, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__})


@functools.cache
def _scored_class(cls):
    call = cls.__call__

    def __call__(self, x, *args, **kwargs):
        out = call(self, x, *args, **kwargs)
        hook = _HOOKS.get(id(self))
        if hook is not None and self.training:
            hook[0]._scored(hook[1], out)
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__})


@functools.cache
def _inputs_class(cls):
    call = cls.__call__

    def __call__(self, inputs, *args, **kwargs):
        hook = _HOOKS.get(id(self))
        if hook is not None and self.training:
            hook[0]._begin(inputs)
        return call(self, inputs, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__})


class ExpertTracker:
    """Tokens per expert per MoE layer while training, the collapse warning and the aux loss.

    Use it as a context manager around the training loop and call report() when reporting.
    Only training forwards count (evaluation and generation run in eval mode), only real
    tokens count (the padding at the end of a row does not), and a layer that gradient
    checkpointing runs again in the backward pass counts once.
    """

    def __init__(self, model: nn.Module, pad_id: int | None = None, aux_loss: float = 0.0):
        self.model = model
        self.pad_id = pad_id
        self.aux = float(aux_loss or 0.0)
        layers = getattr(model, "layers", None) or []
        self.blocks = [(i, b) for i, layer in enumerate(layers) for b in find_blocks(layer)]
        if self.aux and not self.blocks:
            raise RecipeError(
                "train.moe_aux_loss: this model has no experts (not a mixture-of-experts "
                "model); set it to 0"
            )
        if self.aux and not router_trained(model):
            raise RecipeError(
                "train.moe_aux_loss: the router is frozen, so a load-balancing loss has nothing "
                "to train; set lora.router: true, or train.moe_aux_loss: 0"
            )
        self.warned: set[int] = set()
        self.top_k: dict[int, int] = {}
        self._stack = None
        self._reset_totals()
        self._begin(None)

    def _reset_totals(self) -> None:
        self.totals: dict[int, np.ndarray] = {}
        self.tokens = 0
        self.aux_values: list = []
        self.pending: list = []  # (slot or None for the token count, lazy array)

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if not self.blocks:
            return self
        routed, scored = [], []
        for slot, (_, b) in enumerate(self.blocks):
            routed.append(b.module[b.experts])
            _HOOKS[id(routed[-1])] = (self, slot)
            if self.aux:
                scored.append(b.module[b.router])
                _HOOKS[id(scored[-1])] = (self, slot)
        inner = getattr(self.model, "model", self.model)
        _HOOKS[id(inner)] = (self, -1)
        self._watched = [inner, *routed, *scored]
        self._stack.enter_context(swapped_classes([inner], _inputs_class))
        self._stack.enter_context(swapped_classes(routed, _routed_class))
        self._stack.enter_context(swapped_classes(scored, _scored_class))
        return self

    def __exit__(self, *exc):
        for m in getattr(self, "_watched", []):
            _HOOKS.pop(id(m), None)
        self._watched = []
        self._stack.close()

    # -- called from the swapped classes during a training forward --------------------------

    def _begin(self, inputs) -> None:
        """A new forward pass: its padding mask, and room for its routing records."""
        self.valid = None
        self.n = None
        if inputs is not None and inputs.ndim == 2:
            if self.pad_id is None:
                valid = mx.ones(inputs.shape, dtype=mx.float32)
            else:
                # Padding is what follows a row's last non-pad token (rows are right-padded).
                real = (inputs != self.pad_id).astype(mx.int32)
                valid = (mx.cumsum(real, axis=1, reverse=True) > 0).astype(mx.float32)
            self.valid, self.n = valid, valid.sum()
            self.pending.append((None, self.n))
        self.current: dict[int, tuple] = {}  # slot -> (counts this forward, top k)
        self.logits: dict[int, mx.array] = {}

    def _valid_for(self, shape) -> tuple[mx.array, mx.array]:
        if self.valid is not None and tuple(self.valid.shape) == tuple(shape):
            return self.valid, self.n
        ones = mx.ones(shape, dtype=mx.float32)  # called without the inner model: count all
        return ones, ones.sum()

    def _routed(self, slot: int, indices: mx.array) -> None:
        if slot in self.current:
            return  # the backward pass recomputing this layer
        _, block = self.blocks[slot]
        idx = mx.stop_gradient(indices)
        k = idx.shape[-1]
        valid, _ = self._valid_for(idx.shape[:-1])
        hits = (idx[..., None] == mx.arange(block.num_experts)).astype(mx.float32).sum(axis=-2)
        counts = (hits * valid[..., None]).reshape(-1, block.num_experts).sum(axis=0)
        self.current[slot] = (counts, k)
        self.top_k[slot] = k
        self.pending.append((slot, counts))

    def _scored(self, slot: int, logits: mx.array) -> None:
        self.logits.setdefault(slot, logits)

    # -- the loss and the report ---------------------------------------------------------------

    def aux_term(self):
        """Switch-Transformer balance loss of the last forward, mean over MoE layers (1 = balanced).

        Per layer: experts x sum_e f_e P_e, where f_e is the share of routed tokens expert e got
        (no gradient) and P_e the mean router probability of e over the batch's real tokens.
        """
        terms = []
        for slot, logits in self.logits.items():
            if slot not in self.current:
                continue
            counts, k = self.current[slot]
            valid, n = self._valid_for(logits.shape[:-1])
            n = mx.maximum(n, 1)
            p = mx.softmax(logits.astype(mx.float32), axis=-1)
            mean_p = (p * valid[..., None]).reshape(-1, p.shape[-1]).sum(axis=0) / n
            share = mx.stop_gradient(counts / (n * k))
            terms.append(p.shape[-1] * (share * mean_p).sum())
        if not terms:
            return None
        aux = sum(terms) / len(terms)
        self.aux_values.append(mx.stop_gradient(aux))
        return aux

    def loss(self, loss_fn):
        """loss_fn, or loss_fn plus the aux loss's gradient when train.moe_aux_loss is on.

        The aux term enters as (x - stop_gradient(x)): the returned value stays the plain
        cross-entropy sum (what train_loss reports), the gradient carries the aux loss.
        It is weighted by the micro-batch's target tokens, as the trainer divides by them.
        """
        if not (self.aux and self.blocks):
            return loss_fn

        def with_aux(model, batch, *args, **kwargs):
            ce = loss_fn(model, batch, *args, **kwargs)
            aux = self.aux_term()
            if aux is None:
                return ce
            extra = self.aux * batch.n_targets * aux
            return ce + (extra - mx.stop_gradient(extra))

        return with_aux

    def _flush(self) -> None:
        if not self.pending:
            return
        mx.eval([a for _, a in self.pending])
        for slot, a in self.pending:
            if slot is None:
                self.tokens += int(a.item())
            else:
                c = np.rint(np.array(a)).astype(np.int64)
                self.totals[slot] = self.totals.get(slot, 0) + c
        self.pending = []

    def report(self) -> dict:
        """expert_* metrics since the last report ({} for a dense model or no tokens)."""
        self._flush()
        if not self.blocks or not self.totals:
            return {}
        layer_of = [i for i, _ in self.blocks]
        many = len(set(layer_of)) < len(layer_of)
        counts, shares, collapsed = {}, [], []
        for slot, c in sorted(self.totals.items()):
            i, block = self.blocks[slot]
            counts[f"{i}.{block.path}" if many else str(i)] = c.tolist()
            k, total = self.top_k.get(slot, 1), int(c.sum())
            top = np.sort(c)[::-1][:k]
            share = float(top.sum()) / total if total else 0.0
            shares.append(share)
            if share > collapse_threshold(len(c), k) and total >= 4 * len(c):
                busiest = [int(e) for e in np.argsort(-c, kind="stable")[:k]]
                collapsed.append((slot, i, busiest, share, k, len(c)))
        rec = {
            "expert_tokens": self.tokens,
            "expert_top_share": round(max(shares), 4),
            "expert_counts": counts,
        }
        if self.aux_values:
            rec["expert_aux_loss"] = float(mx.mean(mx.stack(self.aux_values)).item())
        new = [c for c in collapsed if c[0] not in self.warned]
        if new:
            self.warned.update(c[0] for c in new)
            rec["expert_warning"] = self._warning(new)
        self._reset_totals()
        return rec

    def _warning(self, collapsed) -> str:
        _, layer, busiest, share, k, n = collapsed[0]
        more = f" (and {len(collapsed) - 1} more layers)" if len(collapsed) > 1 else ""
        if not router_trained(self.model):
            advice = (
                "the router is frozen, so the layers below it drifted; lower "
                "train.learning_rate or train fewer layers"
            )
        elif self.aux:
            advice = "raise train.moe_aux_loss or lower train.learning_rate"
        else:
            advice = (
                "add a load-balancing loss (train.moe_aux_loss: 0.01), lower "
                "train.learning_rate, or keep the router frozen (lora.router: false)"
            )
        return (
            f"expert collapse? in layer {layer}{more}, experts {', '.join(map(str, busiest))} "
            f"took {share:.0%} of routed tokens (balanced: {k / n:.0%}); {advice}"
        )
