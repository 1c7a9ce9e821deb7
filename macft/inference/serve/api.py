"""The OpenAI API's requests and answers: a request body checked into a Job, results as the
JSON objects and stream chunks its clients read, mistakes as its error JSON with a 4xx."""

import time
import uuid

from macft.errors import MacftError
from macft.inference.chat import as_text, render_conversation
from macft.inference.serve.catalog import Catalog, Served
from macft.inference.serve.engine import Job

DEFAULT_MAX_TOKENS = 512
ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status)
        error = {"message": str(self), "type": kind or "invalid_request_error"}
        return {"error": {**error, "param": self.param, "code": self.code}}


def _get(body: dict, name: str, kinds, default=None, lo=None, hi=None):
    """body[name] if of `kinds` and within [lo, hi] (bools are not numbers), else default."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("float", "number") for k in kinds)
        raise ApiError(400, f"{name} must be {names}, not {type(value).__name__}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"{name} must be {rng}, not {value}", name)
    return value


def _text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return as_text(content)
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return as_text("".join(p["text"] for p in content))
    raise ApiError(400, f"{where} must be a string or a list of text parts", where)


def _messages(body: dict, served: Served) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} needs a role ({', '.join(ROLES)})", where)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text(m.get("content"), f"{where}.content")})
    if served.system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": served.system})  # the run's, as chat does
    return out


def parse(body, catalog: Catalog, chat: bool, encode) -> tuple[Served, Job, bool, dict]:
    """A request body -> (what it asks for, its Job, stream?, stream_options); ApiError else.

    encode(text, special) -> token ids (the caller serialises the tokenizer)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "model must be the name of a served model (GET /v1/models)", "model")
    served = catalog.get(name)
    if served is None:
        known = ", ".join(s.name for s in catalog.names())
        raise ApiError(
            404, f"model {name!r} is not served; served: {known}", "model", "model_not_found"
        )
    if _get(body, "n", (int,), 1) != 1:
        raise ApiError(400, "n must be 1: one answer per request", "n")
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    ):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", "stop")
    if chat:
        try:
            text = render_conversation(catalog.tokenizer, _messages(body, served), "message")
        except MacftError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = encode(text, False)  # the template holds the special tokens
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", "prompt")
        ids = encode(as_text(prompt), True)
    if not ids:
        raise ApiError(400, "the prompt is empty once tokenized", "prompt")
    ctx = catalog.context
    limit = _get(body, "max_completion_tokens", (int,), None, lo=1)
    limit = _get(body, "max_tokens", (int,), limit, lo=1)
    if ctx and len(ids) + (limit or 1) > ctx:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens{f' and max_tokens {limit}' if limit else ''}; "
            f"this model's context is {ctx} tokens: shorten the prompt",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    if limit is None:
        limit = min(DEFAULT_MAX_TOKENS, ctx - len(ids)) if ctx else DEFAULT_MAX_TOKENS
    job = Job(
        name=name,
        prompt=ids,
        max_tokens=limit,
        temp=float(_get(body, "temperature", (int, float), 1.0, lo=0, hi=2)),
        top_p=float(_get(body, "top_p", (int, float), 1.0, lo=0, hi=1)),
        seed=_get(body, "seed", (int,), None, lo=0, hi=2**64 - 1),
        stop=stop or [],
    )
    return served, job, stream, options


class Answer:
    """The JSON a request's answer is written as: whole, or as stream chunks."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(job: Job) -> dict:
        n, m = len(job.prompt), len(job.tokens)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def whole(self, text: str, reason: str, job: Job) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            head = self._head("chat.completion")
        else:
            choice, head = {"index": 0, "text": text}, self._head("text_completion")
        choice.update(finish_reason=reason, logprobs=None)
        return {**head, "choices": [choice], "usage": self.usage(job)}

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice, head = {"index": 0, "delta": delta}, self._head("chat.completion.chunk")
        else:
            choice, head = {"index": 0, "text": text or ""}, self._head("text_completion")
        choice.update(finish_reason=reason, logprobs=None)
        return {**head, "choices": [choice]}

    def usage_chunk(self, job: Job) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage(job)}
