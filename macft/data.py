"""Training data: read .jsonl (chat, prompt/completion, text), tokenize, mask the targets, split."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from macft.data_checks import read_jsonl
from macft.errors import DataError

__all__ = ["DataReport", "Example", "encode_record", "load_data", "read_jsonl"]


@dataclass
class Example:
    ids: np.ndarray  # int32 token ids, length T (<= max_seq_length)
    mask: np.ndarray  # bool, length T; True = token i is a target, predicted from ids[:i]


@dataclass
class DataReport:
    format: str  # "chat" | "completion" | "text"
    n_train: int
    n_valid: int
    n_truncated: int  # examples cut to max_seq_length
    n_dropped: int  # examples with no target token left after truncation
    train_tokens: int
    train_target_tokens: int
    lengths: list[int]  # per train example, after truncation (a memory planner reads these)
    sources: dict  # {"train": path, "valid": path or "held out from <file>: N lines" or "none"}


def _example(ids: list[int], targets: list[tuple[int, int]]) -> Example:
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in targets:
        mask[start:end] = True
    mask[:1] = False  # the first token has nothing to be predicted from
    return Example(np.asarray(ids, dtype=np.int32), mask)


def _lcp(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _has_template(tokenizer) -> bool:
    has = getattr(tokenizer, "has_chat_template", None)
    return bool(has) if has is not None else getattr(tokenizer, "chat_template", None) is not None


def _eos_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _render(tokenizer, messages: list[dict], gen: bool) -> str:
    # Text, then encode: transformers 5 returns a dict for tokenize=True; this is what mlx-lm does.
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    except Exception as e:  # e.g. Gemma's template raises on a system message
        raise DataError(
            f"the model's chat template rejects this conversation ({e}); "
            "adapt the data (e.g. drop system messages and data.system) or use the text format"
        ) from e


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def _turn_end(tokenizer, new: list[int], eos: set[int]) -> int:
    """How many of an assistant turn's new tokens are targets: through the end-of-turn token."""
    for i, t in enumerate(new):
        if t in eos:
            return i + 1
    # No eos (e.g. Gemma's <end_of_turn>): drop the template's trailing whitespace only.
    end = len(new)
    while end > 1 and not tokenizer.decode(new[end - 1 : end]).strip():
        end -= 1
    return end


def _encode_chat(tokenizer, messages: list[dict]) -> Example:
    """Mark the tokens each assistant turn adds to the rendered conversation."""
    full = _encode(tokenizer, _render(tokenizer, messages, False))
    eos, targets = _eos_ids(tokenizer), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _encode(tokenizer, _render(tokenizer, messages[:i], True))
        after = (
            full
            if i == len(messages) - 1
            else _encode(tokenizer, _render(tokenizer, messages[: i + 1], False))
        )
        start = _lcp(before, after)  # one boundary token may merge with the reply: it is a target
        end = start + _turn_end(tokenizer, after[start:], eos)
        if start < len(before) - 1 or _lcp(after, full) < end:
            # The template rewrites earlier turns (e.g. Qwen3 drops think blocks): find the text.
            return _encode_chat_by_offsets(tokenizer, messages, eos)
        targets.append((start, end))
    return _example(full, targets)


def _encode_chat_by_offsets(tokenizer, messages: list[dict], eos: set[int]) -> Example:
    """Fallback: locate each assistant content in the full text and map chars to tokens."""
    text = _render(tokenizer, messages, False)
    hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    try:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise DataError(
            "this model's chat template renders earlier turns differently from later prefixes and "
            "its tokenizer has no char offsets; use one assistant turn per line or the text format"
        ) from e
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    specials = eos | set(getattr(hf, "all_special_ids", ()))
    mask, cursor = np.zeros(len(ids), dtype=bool), 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        pos = text.find(m["content"], cursor)
        if pos < 0:
            raise DataError(
                "this model's chat template changes the assistant text, so the loss cannot be "
                "placed on it; use the prompt/completion or text format"
            )
        cursor = pos + len(m["content"])
        hit = [j for j, (s, e) in enumerate(offsets) if s < cursor and e > pos and e > s]
        if hit:
            mask[hit[0] : hit[-1] + 1] = True
            if hit[-1] + 1 < len(ids) and ids[hit[-1] + 1] in specials:
                mask[hit[-1] + 1] = True  # the end-of-turn token
    mask[:1] = False
    return Example(np.asarray(ids, dtype=np.int32), mask)


def encode_record(record: dict, fmt: str, tokenizer, system: str | None = None) -> Example:
    """Tokenize one checked record (untruncated); mask marks what the loss covers."""
    if fmt == "chat" or (fmt == "completion" and _has_template(tokenizer)):
        if fmt == "chat":
            msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
            if not _has_template(tokenizer):
                raise DataError(
                    'chat data ({"messages"}) needs a model with a chat template; this tokenizer '
                    'has none: use {"prompt", "completion"} or {"text"} lines'
                )
        else:
            msgs = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
        if system is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return _encode_chat(tokenizer, msgs)
    eos = getattr(tokenizer, "eos_token_id", None)
    if fmt == "completion":
        prompt = _encode(tokenizer, record["prompt"], special=True)
        ids = _encode(tokenizer, record["prompt"] + record["completion"], special=True)
        start = _lcp(prompt, ids)
    elif fmt == "text":
        ids, start = _encode(tokenizer, record["text"], special=True), 1
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # so the model learns to stop
    return _example(ids, [(start, len(ids))])


def _clip(record: dict, limit: int) -> dict:
    """Cut strings far beyond max_seq_length (a 10 MB line) before the slow tokenizer sees them.

    At <= 64 chars per token the cut part is past max_seq_length anyway: the example is still
    truncated (and counted) and keeps the same tokens."""

    def cut(s):
        return s[:limit] if isinstance(s, str) else s

    if "messages" in record:
        return {"messages": [{**m, "content": cut(m["content"])} for m in record["messages"]]}
    return {k: cut(v) for k, v in record.items()}


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic held-out indices; both lists keep file order."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "")
    return shown or "nothing (it is empty)"


def _find_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        train, valid = path / "train.jsonl", path / "valid.jsonl"
        if not train.is_file():
            raise DataError(
                f"{path}: no train.jsonl in this folder (it has: {_listing(path)}); "
                "put the training lines in train.jsonl (and optionally valid.jsonl)"
            )
        return train, valid if valid.is_file() else None
    if path.is_file():
        return path, None
    parent = path.parent if path.parent.is_dir() else None
    there = (
        f"; {parent} has: {_listing(parent)}"
        if parent
        else f"; {path.parent} does not exist either"
    )
    raise DataError(
        f"{path} does not exist{there}. Give a .jsonl file or a folder with train.jsonl"
    )


def load_data(
    path: str | Path,
    tokenizer,
    max_seq_length: int,
    valid_fraction: float,
    seed: int,
    system: str | None = None,
) -> tuple[list[Example], list[Example], DataReport]:
    """Read, check, split, tokenize and truncate; the report counts every cut and drop."""
    train_file, valid_file = _find_files(Path(path))
    records, fmt = read_jsonl(train_file)
    if valid_file is not None:
        valid_records, valid_fmt = read_jsonl(valid_file)
        if valid_fmt != fmt:
            raise DataError(
                f"{valid_file}: the lines are {valid_fmt} format while {train_file} is {fmt}; "
                "use the same format in both files"
            )
        valid_source = str(valid_file)
    else:
        train_idx, valid_idx = _split(len(records), valid_fraction, seed)
        valid_records = [records[i] for i in valid_idx]
        records = [records[i] for i in train_idx]
        valid_source = (
            f"held out from {train_file}: {len(valid_idx)} lines" if valid_idx else "none"
        )

    counts = {"truncated": 0, "dropped": 0, "longest": 0}

    def prepare(recs: list[dict]) -> list[Example]:
        out = []
        for rec in recs:
            try:
                ex = encode_record(_clip(rec, 64 * max_seq_length), fmt, tokenizer, system)
            except DataError as e:
                raise DataError(f"{train_file}: {e}") from e
            counts["longest"] = max(counts["longest"], len(ex.ids))
            if len(ex.ids) > max_seq_length:
                counts["truncated"] += 1
                ex = Example(ex.ids[:max_seq_length], ex.mask[:max_seq_length])
            if not ex.mask.any():
                counts["dropped"] += 1  # nothing left to learn from after the cut
                continue
            out.append(ex)
        return out

    train_set, valid_set = prepare(records), prepare(valid_records)
    if not train_set:
        raise DataError(
            f"{train_file}: every training example is longer than data.max_seq_length="
            f"{max_seq_length} before its first target token (the longest has "
            f"{counts['longest']} tokens); raise data.max_seq_length"
        )
    lengths = [len(ex.ids) for ex in train_set]
    report = DataReport(
        format=fmt,
        n_train=len(train_set),
        n_valid=len(valid_set),
        n_truncated=counts["truncated"],
        n_dropped=counts["dropped"],
        train_tokens=sum(lengths),
        train_target_tokens=int(sum(ex.mask.sum() for ex in train_set)),
        lengths=lengths,
        sources={"train": str(train_file), "valid": valid_source},
    )
    return train_set, valid_set, report
