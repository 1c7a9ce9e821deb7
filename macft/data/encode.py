"""One record -> token ids and a loss mask: through the chat template, loss on the answers only."""

import bisect
from dataclasses import dataclass

import numpy as np

from macft.errors import DataError
from macft.models.mlx_lm_compat import TokenizerWrapper

# Placeholders for contents while the template renders (Unicode private-use characters).
MARK = ("\ue000", "\ue001")


@dataclass
class Example:
    ids: np.ndarray  # int32 token ids, length T (<= max_seq_length)
    mask: np.ndarray  # bool, length T; True = token i is a target, predicted from ids[:i]


@dataclass
class Pair:
    """A preference pair: the same prompt with the chosen and the rejected answer."""

    chosen: Example
    rejected: Example
    # The reference's (the base, LoRA off) log-probabilities of (chosen, rejected): filled
    # once, the first time the pair trains or validates (train/preference.py).
    ref: np.ndarray | None = None


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


def has_chat_template(tokenizer) -> bool:
    """Does the tokenizer (mlx-lm's wrapper or a bare HF one) carry a chat template?

    The one answer for training, eval, chat and export: completion data goes through the
    template exactly when this says so."""
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


def prompt_ids(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """The text before an assistant turn, as training renders it, and its token ids."""
    text = _render(tokenizer, messages, True)
    return text, _encode(tokenizer, text)


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
    """Mark each assistant turn's tokens: in one render and one tokenization when the template
    leaves the contents as they are (a conversation of thousands of turns stays linear), else
    by rendering each prefix."""
    linear = _encode_chat_linear(tokenizer, messages)
    return linear if linear is not None else _encode_chat_by_prefixes(tokenizer, messages)


def _spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
    """The rendered conversation and each message's content span in it, found by rendering
    numbered placeholders; None when the template treats the real contents otherwise."""
    if any(MARK[0] in m["content"] or MARK[1] in m["content"] for m in messages):
        return None
    marks = [f"{MARK[0]}{i}{MARK[1]}" for i in range(len(messages))]
    marked = _render(
        tokenizer, [{**m, "content": k} for m, k in zip(messages, marks, strict=True)], False
    )
    pieces, spans, cursor, length = [], [], 0, 0
    for m, k in zip(messages, marks, strict=True):
        at = marked.find(k, cursor)
        if at < 0:
            return None
        pieces += [marked[cursor:at], m["content"]]
        length += at - cursor
        spans.append((length, length + len(m["content"])))
        length += len(m["content"])
        cursor = at + len(k)
    pieces.append(marked[cursor:])
    text = "".join(pieces)
    if MARK[0] in marked[cursor:] or text != _render(tokenizer, messages, False):
        return None
    return text, spans


def _generation_prompt(tokenizer, messages: list[dict]) -> str | None:
    """What add_generation_prompt appends before an assistant turn (e.g. ChatML's header)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        return None
    plain, gen = (
        _render(tokenizer, messages[:first], False),
        _render(tokenizer, messages[:first], True),
    )
    return gen[len(plain) :] if gen.startswith(plain) else None


def _encode_chat_linear(tokenizer, messages: list[dict]) -> Example | None:
    """Targets from each assistant content's start (where the generation prompt ends) through
    its end-of-turn token, placed on the whole conversation's tokens by their character
    offsets: what rendering each prefix gives, for templates that keep contents as they are."""
    found = _spans(tokenizer, messages)
    prompt = _generation_prompt(tokenizer, messages)
    if found is None or not prompt:
        return None
    text, spans = found
    hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    try:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None  # a tokenizer without char offsets
    ids, ends = list(enc["input_ids"]), [e for _, e in enc["offset_mapping"]]
    eos, targets, j = _eos_ids(tokenizer), [], 0
    for i, m in enumerate(messages):
        start_char = spans[i][0]
        if m["role"] != "assistant":
            continue
        if text[start_char - len(prompt) : start_char] != prompt:
            return None  # this turn is not rendered as a reply to the generation prompt
        while j < len(ids) and ends[j] <= start_char:  # a token across the boundary is a target
            j += 1
        limit = _token_at(ends, spans[i + 1][0]) if i + 1 < len(messages) else len(ids)
        end = next((k + 1 for k in range(j, limit) if ids[k] in eos), None)
        if end is None:
            return None  # no end-of-turn token: trailing whitespace rules, the slow way
        targets.append((j, end))
    return _example(ids, targets)


def _token_at(ends: list[int], char: int) -> int:
    """The first token ending after `char`."""
    return bisect.bisect_right(ends, char)


def _encode_chat_by_prefixes(tokenizer, messages: list[dict]) -> Example:
    """Mark the tokens each assistant turn adds to the rendered conversation, rendering and
    tokenizing the conversation up to each turn."""
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
    if fmt == "chat" or (fmt == "completion" and has_chat_template(tokenizer)):
        if fmt == "chat":
            msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
            if not has_chat_template(tokenizer):
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


def encode_pair(record: dict, tokenizer, system: str | None = None) -> Pair:
    """A checked preference record -> its two answers, each encoded as SFT data would be
    (through the chat template, loss on the answer only); untruncated, no reference yet."""
    prompt = record["prompt"]

    def side(answer: str) -> Example:
        if isinstance(prompt, list):
            msgs = [*prompt, {"role": "assistant", "content": answer}]
            return encode_record({"messages": msgs}, "chat", tokenizer, system)
        return encode_record(
            {"prompt": prompt, "completion": answer}, "completion", tokenizer, system
        )

    return Pair(side(record["chosen"]), side(record["rejected"]))
