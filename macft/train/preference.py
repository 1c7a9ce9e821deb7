"""Preference tuning (train.method: dpo | orpo): the losses on a batch of pairs, their stats,
and DPO's reference: the same base with LoRA off, in the same process, on the same weights.

A batch of pairs (data/batches.make_pair_batch) has every chosen row, then every rejected row.
Each row's log-probability is the sum over its answer tokens only; the loss is one number per
pair, summed (the trainer divides by the pairs, as SFT divides by the tokens).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.config.schema import TrainConfig
from macft.data.batches import PAD_TO, make_pair_batch
from macft.data.encode import Pair
from macft.lora.apply import lora_disabled
from macft.train.loss import head_fn
from macft.train.step import CompiledStep

# What a preference loss reports beside the loss, each summed over pairs (metrics.jsonl keys).
STATS = ("reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp")


def row_logps(model, batch, loss_chunk: int = 0) -> tuple[mx.array, mx.array]:
    """(log-probability of each row's answer tokens, summed; answer tokens per row).

    With loss_chunk (the train.loss_chunk setting) and a known head, the LM head runs on the
    answer positions only; else on every position, with the mask.
    """
    rows, width = batch.inputs.shape
    tokens = batch.loss_mask.sum(axis=1)
    head = head_fn(model) if loss_chunk else None
    if head is None:
        logits = model(batch.inputs).astype(mx.float32)
        return (-nn.losses.cross_entropy(logits, batch.targets) * batch.loss_mask).sum(1), tokens
    h = model.model(batch.inputs)
    h = h.reshape(-1, h.shape[-1])[batch.index]
    logits = head(h).astype(mx.float32)
    targets = batch.targets.reshape(-1)[batch.index]
    logp = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    logp = logp - mx.logsumexp(logits, axis=-1)
    if batch.weights is not None:  # 0 where the index only pads a shape (train/step.pad_index)
        logp = logp * batch.weights
    # each position's row, as a (rows, positions) 0/1 matrix: the per-row sum as one matmul
    owner = (batch.index[None, :] // width == mx.arange(rows)[:, None]).astype(mx.float32)
    return owner @ logp, tokens


def _log1m_exp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for a log-probability x < 0, kept finite when x rounds to 0."""
    return mx.log(-mx.expm1(mx.minimum(x, -1e-7)))


def pair_losses(
    method: str, beta: float, orpo_lambda: float, logps, tokens, ref=None, dpo_nll: float = 0.0
):
    """(loss per pair, reward per chosen answer, reward per rejected answer).

    DPO: -log sigmoid(beta * ((c - c_ref) - (r - r_ref))), rewards beta * (logp - ref logp);
    with dpo_nll, plus dpo_nll * the chosen answer's mean token NLL (RPO, Pang et al. 2024):
    plain DPO can lower both answers' probabilities as long as the gap grows.
    ORPO: the chosen answer's mean token NLL - lambda * log sigmoid(log odds(c) - log odds(r)),
    on mean token log-probabilities; the rewards are those means.
    """
    n = logps.shape[0] // 2
    c, r = logps[:n], logps[n:]
    if method == "dpo":
        chosen, rejected = beta * (c - ref[:n]), beta * (r - ref[n:])
        losses = -nn.log_sigmoid(chosen - rejected)
        if dpo_nll:  # a Python float: 0 leaves the graph (and the loss) exactly plain DPO's
            losses = losses - dpo_nll * c / tokens[:n]
        return losses, chosen, rejected
    mc, mr = c / tokens[:n], r / tokens[n:]
    log_odds = (mc - mr) - (_log1m_exp(mc) - _log1m_exp(mr))
    return -mc - orpo_lambda * nn.log_sigmoid(log_odds), mc, mr


def preference_loss(cfg: TrainConfig):
    """loss(model, batch, loss_chunk) -> (loss summed over pairs, the STATS summed), for
    nn.value_and_grad: the gradient is the loss's; the stats ride along without one."""

    def loss(model, batch, loss_chunk: int = 0, grad: bool = True):
        logps, tokens = row_logps(model, batch, loss_chunk)
        losses, chosen, rejected = pair_losses(
            cfg.method, cfg.beta, cfg.orpo_lambda, logps, tokens, batch.ref, cfg.dpo_nll
        )
        margin = chosen - rejected
        n = logps.shape[0] // 2
        stats = mx.stack(
            [margin.sum(), (margin > 0).sum().astype(mx.float32), logps[:n].sum(), logps[n:].sum()]
        )
        return losses.sum(), mx.stop_gradient(stats)

    return loss


class Reference:
    """DPO's reference log-probabilities: the base with LoRA swapped out (lora_disabled), so
    no second copy of the model. Computed once per pair, the first time it is met, and kept.

    Each pair is computed alone (two rows), so its values never depend on which pairs share
    its micro-batch: a resumed run, meeting the pairs in another company, gets the same.
    With `compiled` (as the run's steps are) the forward pass is one compiled graph per width,
    traced with LoRA swapped out and only ever called so.
    """

    def __init__(self, model, pad_id: int, loss_chunk: int = 0, compiled: bool = False):
        self.model, self.pad_id, self.loss_chunk = model, pad_id, loss_chunk
        # one trace per pair shape, met once per run: loss positions padded to a multiple of
        # 32 (the head's extra work), not to half the tokens (the trainer's fewer shapes)
        self.forward = CompiledStep(row_logps, model, PAD_TO) if compiled else row_logps

    def fill(self, pairs: list[Pair]) -> None:
        todo = [p for p in pairs if p.ref is None]
        if not todo:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with lora_disabled(self.model):
                for p in todo:
                    batch = make_pair_batch([p], self.pad_id)
                    logps, _ = self.forward(self.model, batch, self.loss_chunk)
                    p.ref = np.array(logps, dtype=np.float32)
        finally:
            self.model.train(was_training)

    def fill_batches(self, batches: list[list[Pair]]) -> None:
        self.fill([p for b in batches for p in b])
