"""Validation loss: the token-weighted mean over a fixed, length-grouped order of the examples."""

from macft.data.batches import batch_order, example_tokens, make_batch
from macft.data.packing import packing_context
from macft.train.loss import batch_loss


def evaluate(
    model,
    valid_set,
    batch_size: int,
    pad_id: int,
    max_batches: int = 0,
    pack: bool = False,
    loss_chunk: int = 0,
    shard: tuple[int, int] = (0, 1),
    reduce=None,
    loss_fn=batch_loss,
    prepare=None,
):
    """Token-weighted mean loss over the validation set (or its first max_batches batches).

    Data parallel: shard=(rank, size) evaluates every size-th example of each batch and
    reduce(loss sum, tokens) adds up the ranks' sums. Preference pairs (loss_fn from
    train/preference.py) give the mean loss per pair; prepare(examples), if given, runs before
    each batch (DPO's reference, for the pairs validation really uses)."""
    if not valid_set:
        return None
    lengths = [example_tokens(e) for e in valid_set]
    batches = batch_order(len(valid_set), batch_size, 0, 0, lengths)  # fixed, length-grouped
    if max_batches:
        batches = batches[:max_batches]
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with packing_context(model, pack):
            for idx in batches:
                idx = idx[shard[0] :: shard[1]]
                if not idx:
                    continue
                examples = [valid_set[i] for i in idx]
                if prepare is not None:
                    prepare(examples)
                batch = make_batch(examples, pad_id, pack)
                if batch.n_targets:
                    loss = loss_fn(model, batch, loss_chunk, grad=False)
                    total += (loss[0] if isinstance(loss, tuple) else loss).item()
                    tokens += batch.n_targets
    finally:
        model.train(was_training)
    if reduce is not None:
        total, tokens = reduce(total, tokens)
    return total / tokens if tokens else None
