"""Preference pairs: read in every shape users have them, encoded through the chat template
with the loss on the answer only, cut and counted, and the pair batch's rows."""

import json

import numpy as np
import pytest
from helpers import PAD, counting_pairs

from macft.data.batches import make_batch
from macft.data.dataset import load_data
from macft.data.jsonl import read_jsonl
from macft.errors import DataError


def runs(tok, ex) -> list[str]:
    """The target tokens of an example, decoded run by run."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ex.mask.astype(int), [0]])))
    return [tok.decode(ex.ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def write(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PROMPT_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
        {  # TRL's conversational shape: messages for the prompt, assistant turns for answers
            "prompt": PROMPT_MESSAGES,
            "chosen": [{"role": "assistant", "content": "Paris"}],
            "rejected": [{"role": "assistant", "content": "Lyon"}],
        },
        {
            "prompt": PROMPT_MESSAGES[1:],
            "chosen": {"role": "assistant", "content": "Paris"},
            "rejected": {"role": "assistant", "content": [{"type": "text", "text": "Lyon"}]},
        },
    ],
)
def test_pair_masks_cover_the_answer_only(tmp_path, tiny_tokenizer, record):
    data = write(tmp_path / "pairs.jsonl", record, record)
    train, valid, rep = load_data(data, tiny_tokenizer, 256, 0.5, 0, method="dpo")
    assert rep.format == "preference" and len(train) == len(valid) == 1
    pair = train[0]
    assert runs(tiny_tokenizer, pair.chosen) == ["Paris<|im_end|>"]
    assert runs(tiny_tokenizer, pair.rejected) == ["Lyon<|im_end|>"]
    start = int(np.argmax(pair.chosen.mask))  # both answers follow the same prompt tokens
    assert start == int(np.argmax(pair.rejected.mask))
    assert pair.chosen.ids[:start].tolist() == pair.rejected.ids[:start].tolist()
    prompt = tiny_tokenizer.decode(pair.chosen.ids[:start].tolist())
    assert "Capital of France?" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert rep.lengths == [max(len(pair.chosen.ids), len(pair.rejected.ids))]  # one row
    assert rep.train_tokens == len(pair.chosen.ids) + len(pair.rejected.ids)
    assert pair.ref is None  # no reference until training meets the pair


def test_long_answers_are_cut_and_counted(tmp_path, tiny_tokenizer):
    rec = {"prompt": "q", "chosen": "x" * 100, "rejected": "y"}
    data = write(tmp_path / "pairs.jsonl", rec)
    train, _, rep = load_data(data, tiny_tokenizer, 40, 0.0, 0, method="orpo")
    assert len(train[0].chosen.ids) == 40 and rep.n_truncated == 1 and rep.n_dropped == 0
    assert train[0].chosen.mask[-1] and len(train[0].rejected.ids) < 40


def test_preference_lines_are_their_own_format(tmp_path):
    mixed = write(
        tmp_path / "mixed.jsonl",
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "completion": "a"},
    )
    with pytest.raises(DataError, match=r"mixed.jsonl:2: line 2 is \{\"prompt\", \"completion\"\}"):
        read_jsonl(mixed)


def test_pair_batch_rows_and_counts():
    pairs = counting_pairs(3)
    for i, p in enumerate(pairs):
        p.ref = np.array([-1.0 - i, -10.0 - i], np.float32)
    batch = make_batch(pairs, PAD)
    assert batch.inputs.shape[0] == 6 and batch.n_targets == 3  # chosen rows, then rejected
    assert np.array(batch.ref).tolist() == [-1, -2, -3, -10, -11, -12]
    first = np.asarray(pairs[0].rejected.ids)
    n = len(first) - 1
    assert np.array(batch.inputs[3, :n]).tolist() == first[:-1].tolist()
    assert np.array(batch.loss_mask).sum() == sum(
        int(e.mask[1:].sum()) for p in pairs for e in (p.chosen, p.rejected)
    )
    pairs[1].ref = None  # a pair without its reference: the batch has none
    assert make_batch(pairs, PAD).ref is None
