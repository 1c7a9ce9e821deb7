"""The HTTP side of `macft serve`: routes, the bearer key, JSON and server-sent events.

The standard library's ThreadingHTTPServer, as mlx-lm's own server uses: a thread per
connection only parses, waits and writes, while the one generation worker owns MLX, so an
async stack would add a dependency and nothing else. Every refusal is OpenAI's error JSON
with a 4xx, and a failing request never stops the server.
"""

import hmac
import json
import queue
import select
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from macft.errors import MacftError
from macft.inference.serve.api import Answer, ApiError, parse
from macft.inference.serve.catalog import Catalog, NameTaken
from macft.inference.serve.engine import Engine

MAX_BODY = 16 * 1024 * 1024  # bytes; a larger request gets 413
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a client stuck mid-stream never holds up Ctrl-C
    allow_reuse_address = True

    def __init__(self, address, catalog: Catalog, engine: Engine, api_key: str | None, log):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.catalog, self.engine, self.api_key, self.log = catalog, engine, api_key, log

    def encode(self, text: str, special: bool) -> list[int]:
        with self.catalog.tokenizer_lock:
            return self.catalog.tokenizer.encode(text, add_special_tokens=special)

    def close(self) -> None:
        """Stop answering, then stop the worker (after serve_forever returned)."""
        self.server_close()
        self.engine.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when it closes
    timeout = 120  # seconds a socket read or write may stall: a silent client frees its thread

    def log_message(self, format, *args):  # the engine logs one line per generation
        pass

    # --- plumbing ------------------------------------------------------------------------

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), key.encode())

    def _body(self):
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a request body needs a Content-Length") from None
        if size < 0 or size > MAX_BODY:
            raise ApiError(413, f"the request body must be at most {MAX_BODY} bytes")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            why = str(e)[:120] if not isinstance(e, RecursionError) else "nested too deeply"
            raise ApiError(400, f"the body is not valid JSON ({why})") from None

    def _route(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health" and method == "GET":
                self._send(200, self._health())
                return
            if not self._authorized():
                raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY")
            if path == "/v1/models" and method == "GET":
                self._send(200, self._models())
            elif path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
                self._complete(self._body(), chat=path.endswith("chat/completions"))
            elif path == "/v1/adapters" and method == "POST":
                self._add_adapter(self._body())
            elif path.startswith("/v1/adapters/") and method == "DELETE":
                self._remove_adapter(path.removeprefix("/v1/adapters/"))
            else:
                raise ApiError(404, f"no route {method} {path}")
        except ApiError as e:
            self._send(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_DELETE(self):
        self._route("DELETE")

    # --- routes --------------------------------------------------------------------------

    def _health(self) -> dict:
        engine, catalog = self.server.engine, self.server.catalog
        return {
            "status": "ok",
            "running": engine.busy,
            "waiting": engine.waiting,
            "resident": catalog.resident_names(),  # least recently used first
            "max_adapters": catalog.max_adapters,
        }

    def _models(self) -> dict:
        models = [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "macft"}
            for s in self.server.catalog.names()
        ]
        return {"object": "list", "data": models}

    def _add_adapter(self, body) -> None:
        path = body.get("path") if isinstance(body, dict) else None
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path or not (name is None or isinstance(name, str)):
            raise ApiError(400, 'give {"path": "RUN FOLDER"} and optionally {"name": "NAME"}')
        catalog = self.server.catalog
        try:
            served = self.server.engine.call(lambda: catalog.add_run(path, name=name or None))
        except MacftError as e:
            raise ApiError(409 if isinstance(e, NameTaken) else 400, str(e), "path") from None
        self.server.log(f"added {served.name} from {served.source}")
        self._send(200, {"id": served.name, "object": "model", "created": served.created})

    def _remove_adapter(self, name: str) -> None:
        catalog, engine = self.server.catalog, self.server.engine
        served = catalog.get(name)
        if served is None:
            raise ApiError(404, f"model {name!r} is not served", "name", "model_not_found")

        def remove():
            catalog.remove(name)  # refuses the base before any request is failed
            engine.evict(name, f"model {name} was removed while answering")

        try:
            engine.call(remove)
        except MacftError as e:
            raise ApiError(400, str(e), "name") from None
        self.server.log(f"removed {name}")
        self._send(200, {"id": name, "object": "model", "deleted": True})

    def _complete(self, body, chat: bool) -> None:
        served, job, stream, options = parse(body, self.server.catalog, chat, self.server.encode)
        answer = Answer(served.name, chat)
        self.server.engine.submit(job)
        try:
            if stream:
                self._stream(job, answer, bool(options.get("include_usage")))
            else:
                self._whole(job, answer)
        finally:
            job.cancel()  # done, failed or the client left: its row is freed

    def _gone(self) -> bool:
        """The client closed its connection (it sends nothing more after its request)."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _whole(self, job, answer: Answer) -> None:
        text, checked = [], time.monotonic()
        while True:
            try:
                kind, value = job.events.get(timeout=0.25)
            except queue.Empty:
                kind = None
            if time.monotonic() - checked > 0.25:  # a few checks a second, tokens or not
                checked = time.monotonic()
                if self._gone():
                    return  # nobody to answer: _complete frees the row
            if kind is None:
                continue
            if kind == "text":
                text.append(value)
            elif kind == "error":
                self._send(500, {"error": {"message": value, "type": "server_error"}})
                return
            else:
                self._send(200, answer.whole("".join(text), value, job))
                return

    def _event(self, data) -> None:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    def _stream(self, job, answer: Answer, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if answer.chat:
            self._event(answer.chunk(None, first=True))
        while True:
            kind, value = job.events.get()
            if kind == "text":
                self._event(answer.chunk(value))
            elif kind == "error":
                self._event({"error": {"message": value, "type": "server_error"}})
                break
            else:
                self._event(answer.chunk(None, value))
                if include_usage:
                    self._event(answer.usage_chunk(job))
                break
        self._event("[DONE]")


def check_host(host: str, api_key: str | None) -> None:
    """Safe by default: beyond this machine only with a key."""
    if host not in LOCAL_HOSTS and not api_key:
        raise MacftError(
            f"--host {host} opens the server beyond this machine; give --api-key KEY so only "
            "clients with the key are answered"
        )


def make_server(catalog: Catalog, host: str, port: int, api_key: str | None, log) -> Server:
    """The engine started and the socket bound; serve_forever() answers."""
    check_host(host, api_key)
    engine = Engine(catalog, log=log).start()
    try:
        return Server((host, port), catalog, engine, api_key, log)
    except OSError as e:
        engine.close()
        raise MacftError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port"
        ) from None
