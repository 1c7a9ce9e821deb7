"""Held-out data for eval: examples masked as in training, and (prompt, reference) pairs."""

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from macft.data.encode import Example, encode_record, has_chat_template, prompt_ids
from macft.data.jsonl import read_jsonl
from macft.errors import DataError

# Plain English paragraphs that ship with macft: the forgetting check's text.
GENERAL_TEXT = Path(str(files("macft").joinpath("examples", "general.txt")))


@dataclass
class Case:
    index: int  # line number in the data file, from 1
    prompt: str  # the prompt as text (what the user would see)
    prompt_ids: list[int]  # exactly what generation starts from
    reference: str
    one_line: bool  # the reference has no line break: cut answers at the first one


def loss_examples(records: list[dict], fmt: str, tokenizer, max_len: int, system=None):
    """Examples tokenized and masked exactly as training does, cut to max_seq_length."""
    out = []
    for rec in records:
        ex = encode_record(rec, fmt, tokenizer, system)
        ex = Example(ex.ids[:max_len], ex.mask[:max_len])
        if ex.mask.any():
            out.append(ex)
    return out


def general_examples(tokenizer, max_len: int, path: Path = GENERAL_TEXT) -> list[Example]:
    """The shipped plain-English paragraphs (blank-line separated), every token a target."""
    paragraphs = [" ".join(p.split()) for p in path.read_text(encoding="utf-8").split("\n\n")]
    records = [{"text": p} for p in paragraphs if p]
    return loss_examples(records, "text", tokenizer, max_len)


def make_case(index: int, rec: dict, fmt: str, tokenizer, split_on: str, system=None):
    """A (prompt, reference) pair, or None for a text line without the separator."""
    if fmt == "chat":
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            return None
        msgs, reference = msgs[:last], msgs[last]["content"]
    elif fmt == "completion":
        msgs, reference = [{"role": "user", "content": rec["prompt"]}], rec["completion"]
        if not has_chat_template(tokenizer):
            ids = list(tokenizer.encode(rec["prompt"], add_special_tokens=True))
            return Case(index, rec["prompt"], ids, reference, "\n" not in reference.strip())
    else:
        text = rec["text"]
        pos = text.rfind(split_on)
        if pos < 0:
            return None
        # Trailing spaces go to the answer: BPE tokenizers glue a space to the next word
        # (" SELECT"), so a prompt ending in a bare space is one the model never saw.
        prompt = text[: pos + len(split_on)].rstrip(" \t")
        reference = text[pos + len(split_on) :].strip()
        ids = list(tokenizer.encode(prompt, add_special_tokens=True))
        return Case(index, prompt, ids, reference, "\n" not in reference)
    if system is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    prompt, ids = prompt_ids(tokenizer, msgs)
    return Case(index, prompt, ids, reference.strip(), "\n" not in reference.strip())


def load_eval_data(path: str, limit: int | None):
    """(records, format) of a .jsonl file, checked as training checks it; the first `limit`."""
    p = Path(path).expanduser()
    if not p.is_file():
        where = p.parent if p.parent.is_dir() else None
        there = ""
        if where is not None:
            names = sorted(c.name for c in where.iterdir() if c.suffix == ".jsonl")[:8]
            there = f" ({where} has: {', '.join(names) or 'no .jsonl files'})"
        raise DataError(f"--data {path}: no such file{there}; give a held-out .jsonl file")
    records, fmt = read_jsonl(p)
    if limit:
        records = records[:limit]
    return records, fmt


def make_cases(records, fmt, tokenizer, split_on: str, system=None) -> tuple[list[Case], int]:
    """Cases for generation and how many lines had nothing to split; none at all is an error."""
    cases, skipped = [], 0
    for i, rec in enumerate(records, 1):
        case = make_case(i, rec, fmt, tokenizer, split_on, system)
        if case is None or not case.reference:
            skipped += 1
            continue
        cases.append(case)
    if not cases:
        if fmt == "text":
            raise DataError(
                f"no line of --data contains --split-on {split_on!r}, so there is no reference "
                "answer to score; give the text that precedes the answer, e.g. --split-on 'A: '"
            )
        raise DataError("no line of --data has an answer to score (a last assistant turn)")
    return cases, skipped


def chosen_records(pairs: list[dict]) -> tuple[list[dict], str]:
    """Preference records as SFT records whose answer is the chosen one: their loss and greedy
    answers are scored as any held-out data's. Through a chat template a text prompt is one
    user message, so a file mixing text and message prompts becomes chat data."""
    if all(isinstance(r["prompt"], str) for r in pairs):
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs], "completion"
    out = []
    for r in pairs:
        p = r["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        out.append({"messages": [*msgs, {"role": "assistant", "content": r["chosen"]}]})
    return out, "chat"


def target_tokens(examples) -> int:
    return int(sum(np.count_nonzero(e.mask[1:]) for e in examples))
