"""A chat session: a model (maybe with a run's adapters) and one history per side."""

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from macft.atomic import atomic_write_bytes
from macft.data.encode import has_chat_template
from macft.errors import MacftError
from macft.lora.apply import lora_disabled
from macft.runs.model import RunModel


def as_text(text: str) -> str:
    """Text the tokenizer takes: bytes a terminal, pipe or argument held that were not UTF-8
    reach Python as lone surrogates; each becomes U+FFFD, as a UTF-8 decoder shows them."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that was never a byte
        return text.encode("utf-8", "replace").decode("utf-8")


def render_conversation(tok, msgs: list[dict], hint: str = "(/system none)") -> str:
    """Messages through the model's chat template, ready for the assistant's answer."""
    if not has_chat_template(tok):
        # No template: the text is what training saw for prompt/completion data, concatenated.
        return "".join(m["content"] for m in msgs)
    try:
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # e.g. a template that rejects system messages
        raise MacftError(
            f"the model's chat template rejects this conversation ({e}); "
            f"try without a system prompt {hint}"
        ) from None


@dataclass
class Side:
    name: str  # "base" or "fine-tune"
    lora: bool  # answer with the adapters on
    messages: list[dict] = field(default_factory=list)  # user/assistant turns, no system
    last_prompt: str = ""  # the exact text the model was given for the last answer


class ChatSession:
    """Histories, sampling settings and generation; one model, LoRA toggled per side."""

    def __init__(self, cm: RunModel, system=None, temp=0.7, top_p=0.9, max_tokens=512, seed=None):
        self.cm = cm
        self.system = system if system is not None else cm.system
        self.temp, self.top_p, self.max_tokens, self.seed = temp, top_p, max_tokens, seed
        self.tuned = Side("fine-tune", True) if cm.adapters else None
        self.base = Side("base", False)
        self.compare = False

    @property
    def has_adapters(self) -> bool:
        return self.tuned is not None

    def sides(self) -> list[Side]:
        if self.tuned is None:
            return [self.base]
        return [self.base, self.tuned] if self.compare else [self.tuned]

    @property
    def main(self) -> Side:
        return self.tuned or self.base

    def set_compare(self, on: bool) -> None:
        if on and not self.compare and self.tuned is not None:
            # The base joins the conversation as it stands; from here each side keeps its own.
            self.base.messages = [dict(m) for m in self.tuned.messages]
        self.compare = on and self.tuned is not None

    def reset(self) -> None:
        for side in filter(None, (self.base, self.tuned)):
            side.messages, side.last_prompt = [], ""

    def conversation(self, side: Side, user: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": as_text(self.system)}] if self.system else []
        turn = [{"role": "user", "content": user}] if user is not None else []
        return system + side.messages + turn

    def render(self, side: Side, user: str) -> str:
        """The prompt text: the whole conversation through the chat template, ready to answer."""
        return render_conversation(self.cm.tokenizer, self.conversation(side, user))

    def stream(self, side: Side, user: str):
        """Yield mlx-lm GenerationResponses; the exchange joins the history only when complete."""
        user = as_text(user)
        side.last_prompt = self.render(side, user)
        ids = self.cm.tokenizer.encode(side.last_prompt, add_special_tokens=False)
        if self.seed is not None:
            mx.random.seed(self.seed)  # per answer, so both sides of --compare sample alike
        sampler = make_sampler(temp=self.temp, top_p=self.top_p if self.temp > 0 else 0.0)
        model, tok, text = self.cm.model, self.cm.tokenizer, ""
        with lora_disabled(model) if not side.lora else contextlib.nullcontext():
            for r in stream_generate(model, tok, ids, max_tokens=self.max_tokens, sampler=sampler):
                text += r.text
                yield r
        side.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]

    def record(self, side: Side | None = None) -> tuple[dict | None, int]:
        """The conversation as one line of macft's chat training format; blank answers dropped."""
        side = side or self.main
        pairs = list(zip(side.messages[::2], side.messages[1::2], strict=True))
        # Training rejects empty messages, so exchanges with a blank answer are left out.
        kept = [
            (u, {**a, "content": a["content"].strip()}) for u, a in pairs if a["content"].strip()
        ]
        if not kept:
            return None, len(pairs)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {"messages": system + [m for pair in kept for m in pair]}, len(pairs) - len(kept)

    def save(self, path: str, side: Side | None = None) -> tuple[int, int]:
        """Append the conversation to a .jsonl file; returns (exchanges saved, dropped)."""
        rec, dropped = self.record(side)
        if rec is None:
            raise MacftError("nothing to save yet: no answered question in this conversation")
        p = Path(path).expanduser()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            old = p.read_bytes() if p.is_file() else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            # The whole file is rewritten under a temp name: a kill never leaves a torn line.
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            atomic_write_bytes(p, old + line.encode("utf-8"))
        except OSError as e:
            raise MacftError(f"cannot write {p}: {e.strerror}; give another file") from None
        return sum(m["role"] == "assistant" for m in rec["messages"]), dropped
