"""macft serve on a tiny base with three runs: the real HTTP server on an ephemeral port, driven
by the openai client and curl; answers equal `macft chat --temp 0` whatever shares the batch;
bad requests get 4xx and the server goes on; keys, adapters added and removed, Ctrl-C; with
room for two adapters, they load on demand and the least recently used idle one is evicted."""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import openai
import pytest
from click.testing import CliRunner
from helpers import ROOT, save_tiny_model_dir, write_lora_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from macft.cli import cli
from macft.errors import MacftError, ModelError
from macft.inference.chat import ChatSession
from macft.inference.serve.catalog import open_catalog
from macft.inference.serve.engine import Job
from macft.inference.serve.server import make_server
from macft.runs.model import load_run_model

QUESTIONS = ["show routes in junos?", "list interfaces?", "a much longer question, to pad: why?"]
N = 10  # tokens per greedy answer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny base and three runs of it: net (rank 4, every linear), sql (rank 8, attention)
    and dora (DoRA, rank 4)."""
    root = tmp_path_factory.mktemp("serve")
    base = save_tiny_model_dir(root / "tiny")
    write_lora_run(root / "net", base, seed=1, rank=4, system="You are a network engineer.")
    write_lora_run(root / "sql", base, seed=2, rank=8, targets="attention")
    write_lora_run(root / "dora", base, seed=3, dora=True)
    return root


@pytest.fixture(scope="module")
def chat_answers(root):
    """What `macft chat NAME --temp 0` answers each question: (token ids, text, prompt)."""
    answers = {}
    for name in ("net", "sql", "dora", "tiny"):
        session = ChatSession(load_run_model(str(root / name)), temp=0, max_tokens=N)
        for q in QUESTIONS:
            session.reset()
            rs = list(session.stream(session.main, q))
            text = "".join(r.text for r in rs)
            answers[name, q] = ([r.token for r in rs], text, session.main.last_prompt)
    return answers


def serving(root, **kw):
    """The real server on the three runs, answering on a thread; its log lines in srv.logs."""
    catalog, _ = open_catalog([str(root / name) for name in ("net", "sql", "dora")], None, **kw)
    logs = []
    srv = make_server(catalog, "127.0.0.1", 0, None, logs.append)
    srv.logs = logs
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.close()
        thread.join()


@pytest.fixture(scope="module")
def server(root):
    yield from serving(root)


@pytest.fixture(scope="module")
def capped(root):
    yield from serving(root, max_adapters=2)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def raw(server, method, path, body=b"", headers=None):
    """(status, parsed JSON or the text of a stream) for a hand-made request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        if r.getheader("Content-Type") == "text/event-stream":
            return r.status, data.decode()
        return r.status, json.loads(data)
    finally:
        conn.close()


def ask(name, q, **kw):
    return {"model": name, "messages": [{"role": "user", "content": q}], **kw}


# --- answers as chat gives them, alone or in mixed batches --------------------------------


def test_mixed_batches_answer_token_for_token_as_chat(server, chat_answers):
    engine, catalog = server.engine, server.catalog
    for order in (["net", "sql", "tiny"], ["tiny", "net", "dora", "sql", "tiny", "sql", "dora"]):
        jobs = []
        for i, name in enumerate(order):
            q = QUESTIONS[i % len(QUESTIONS)]
            ids = catalog.tokenizer.encode(chat_answers[name, q][2], add_special_tokens=False)
            jobs.append((name, q, Job(name, ids, N, temp=0)))
        # Queued from the worker itself, so all of them join one batch at the next step.
        engine.call(lambda jobs=jobs: [engine.submit(job) for _, _, job in jobs])
        for name, q, job in jobs:
            while job.events.get()[0] != "end":
                pass
            assert job.tokens == chat_answers[name, q][0], (order, name, q)
    assert engine.widest >= 6  # one step ran all six rows


def test_openai_client_chat_and_completions(client, chat_answers):
    names = {m.id for m in client.models.list().data}
    assert names == {"tiny", "net", "sql", "dora"}
    q = QUESTIONS[0]
    r = client.chat.completions.create(**ask("net", q), temperature=0, max_tokens=N)
    assert r.choices[0].message.content == chat_answers["net", q][1]
    assert r.choices[0].finish_reason == "length" and r.model == "net"
    assert r.usage.completion_tokens == N and r.usage.total_tokens == r.usage.prompt_tokens + N
    stream = client.chat.completions.create(
        **ask("sql", q), temperature=0, max_tokens=N, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_answers["sql", q][1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == N
    c = client.completions.create(model="tiny", prompt="hello", temperature=0, max_tokens=5)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5
    streamed = client.completions.create(
        model="tiny", prompt="hello", temperature=0, max_tokens=5, stream=True
    )
    assert "".join(x.choices[0].text for x in streamed) == c.choices[0].text


def test_stop_strings_seed_and_sampling(client, chat_answers):
    q = QUESTIONS[1]
    full = chat_answers["net", q][1]
    stop = full[4:6]
    r = client.chat.completions.create(**ask("net", q), temperature=0, max_tokens=N, stop=[stop])
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    kw = {"temperature": 1.5, "top_p": 0.95, "max_tokens": 8}
    a = client.chat.completions.create(**ask("sql", q), seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(**ask("sql", q), seed=7, **kw).choices[0].message.content
    assert a == b  # the same seed, the same answer


def test_curl_streamed_and_not(server, chat_answers):
    curl = shutil.which("curl")
    assert curl, "the serve tests use curl"
    q = QUESTIONS[2]
    body = json.dumps(ask("net", q, temperature=0, max_tokens=N))
    url = server.url + "/v1/chat/completions"
    args = [curl, "-sS", url, "-H", "Content-Type: application/json", "-d"]
    out = subprocess.run([*args, body], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["content"] == chat_answers["net", q][1]
    body = json.dumps(ask("net", q, temperature=0, max_tokens=N, stream=True))
    out = subprocess.run([*args, body, "-N"], capture_output=True, text=True, check=True).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == chat_answers["net", q][1]


# --- refusals ------------------------------------------------------------------------------

GOOD = ask("net", "hi", max_tokens=2, temperature=0)  # greedy: a sampled first token may end it
BAD = [
    (b"{not json", 400),
    (b"\xff\xfe", 400),
    (b"[1, 2]", 400),
    (b'"text"', 400),
    (json.dumps({**GOOD, "model": "nope"}), 404),
    (json.dumps({**GOOD, "model": 3}), 400),
    (json.dumps({k: v for k, v in GOOD.items() if k != "model"}), 400),
    (json.dumps({**GOOD, "messages": []}), 400),
    (json.dumps({**GOOD, "messages": "hi"}), 400),
    (json.dumps({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}), 400),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": 5}]}), 400),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": [{"type": "image"}]}]}), 400),
    (json.dumps({**GOOD, "max_tokens": -1}), 400),
    (json.dumps({**GOOD, "max_tokens": 0}), 400),
    (json.dumps({**GOOD, "max_tokens": "5"}), 400),
    (json.dumps({**GOOD, "max_tokens": True}), 400),
    (json.dumps({**GOOD, "max_tokens": 100000}), 400),
    (json.dumps({**GOOD, "temperature": "hot"}), 400),
    (json.dumps({**GOOD, "temperature": -1}), 400),
    (json.dumps({**GOOD, "top_p": 2}), 400),
    (json.dumps({**GOOD, "seed": 1.5}), 400),
    (json.dumps({**GOOD, "seed": -1, "temperature": 1}), 400),
    (json.dumps({**GOOD, "seed": 2**64, "temperature": 1}), 400),
    (json.dumps({**GOOD, "stop": 5}), 400),
    (json.dumps({**GOOD, "stop": ["a", "b", "c", "d", "e"]}), 400),
    (json.dumps({**GOOD, "stream": "yes"}), 400),
    (json.dumps({**GOOD, "n": 2}), 400),
    (json.dumps(ask("net", "why? " * 200)), 400),  # longer than the 512-token context
    (b"[" * 100000 + b"]" * 100000, 400),
]


def test_malformed_requests_get_4xx_and_the_server_goes_on(server):
    for body, status in BAD:
        body = body.encode() if isinstance(body, str) else body
        got, answer = raw(server, "POST", "/v1/chat/completions", body)
        assert got == status, (body[:80], answer)
        assert isinstance(answer["error"]["message"], str) and answer["error"]["type"]
    assert raw(server, "POST", "/v1/completions", json.dumps({"model": "tiny"}))[0] == 400
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "POST", "/v1/chat/completions", b"{}", {"Content-Length": "x"})[0] in (
        400,
        411,
    )
    lone = ask("net", "a lone surrogate \ud800 from a JSON escape", max_tokens=2)
    assert raw(server, "POST", "/v1/chat/completions", json.dumps(lone))[0] == 200
    status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(GOOD))
    assert status == 200 and answer["usage"]["completion_tokens"] == 2
    assert server.engine.busy == 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(sorted(GOOD) + ["temperature", "top_p", "stop", "seed"]), value=JSON)
def test_fuzzed_fields_never_break_the_server(server, key, value):
    status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps({**GOOD, key: value}))
    assert status == 200 or (400 <= status < 500 and "message" in answer["error"]), answer


def test_api_key_is_checked(server):
    server.api_key = "s3cret"
    try:
        assert raw(server, "GET", "/v1/models")[0] == 401
        assert raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})[0] == 401
        assert raw(server, "GET", "/health")[0] == 200  # health says nothing about the models
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert {m.id for m in ok.models.list().data} == {"tiny", "net", "sql", "dora"}
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(**ask("net", "hi"), max_tokens=2)
    finally:
        server.api_key = None
    with pytest.raises(MacftError, match="--api-key"):
        make_server(server.catalog, "0.0.0.0", 0, None, print)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(server, stream):
    before = len(server.logs)
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    body = json.dumps(ask("tiny", "go on", max_tokens=480, stream=stream, temperature=0))
    conn.request("POST", "/v1/chat/completions", body=body)
    if stream:
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        r.close()
    conn.close()  # gone after the first event, or before any answer
    while not any(line.startswith("tiny: ") for line in server.logs[before:]):
        status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(GOOD))
        assert status == 200, answer
    (line,) = [x for x in server.logs[before:] if x.startswith("tiny: ")]
    assert "cancelled" in line and int(re.search(r"(\d+) out", line)[1]) < 480, line


def test_adapters_added_and_removed_while_serving(server, root, client, chat_answers, tmp_path):
    copy = tmp_path / "net2"
    shutil.copytree(root / "net", copy)
    status, answer = raw(server, "POST", "/v1/adapters", json.dumps({"path": str(copy)}))
    assert status == 200 and answer["id"] == "net2"
    q = QUESTIONS[0]
    r = client.chat.completions.create(**ask("net2", q), temperature=0, max_tokens=N)
    assert r.choices[0].message.content == chat_answers["net", q][1]
    assert raw(server, "POST", "/v1/adapters", json.dumps({"path": str(copy)}))[0] == 409
    assert raw(server, "POST", "/v1/adapters", json.dumps({"path": str(tmp_path / "x")}))[0] == 400
    assert raw(server, "POST", "/v1/adapters", b'{"path": 3}')[0] == 400
    # A long answer with net2 is under way when net2 goes: it ends with an error, not the base.
    job = Job("net2", [5, 6, 7], 400, temp=0)
    server.engine.submit(job)
    assert job.events.get()[0] == "text"
    assert raw(server, "DELETE", "/v1/adapters/net2")[0] == 200
    while (event := job.events.get())[0] == "text":
        pass
    assert event == ("error", "model net2 was removed while answering")
    assert raw(server, "DELETE", "/v1/adapters/tiny")[0] == 400  # the base stays
    assert raw(server, "DELETE", "/v1/adapters/net2")[0] == 404
    assert raw(server, "POST", "/v1/chat/completions", json.dumps(ask("net2", q)))[0] == 404
    r = client.chat.completions.create(**ask("net", q), temperature=0, max_tokens=N)
    assert r.choices[0].message.content == chat_answers["net", q][1]


# --- adapters loaded on demand, at most two at once ---------------------------------------


def answer(server, job: Job) -> Job:
    """Submit a job and wait for its end (an error fails the test)."""
    server.engine.submit(job)
    while (event := job.events.get())[0] == "text":
        pass
    assert event[0] == "end", event
    return job


def chat_job(server, chat_answers, name, q, max_tokens=N) -> Job:
    ids = server.catalog.tokenizer.encode(chat_answers[name, q][2], add_special_tokens=False)
    return Job(name, ids, max_tokens, temp=0)


def test_capped_server_loads_on_demand_and_evicts_the_least_recently_used(capped, chat_answers):
    status, health = raw(capped, "GET", "/health")
    assert status == 200 and health["max_adapters"] == 2
    models = {m["id"] for m in raw(capped, "GET", "/v1/models")[1]["data"]}
    assert models == {"tiny", "net", "sql", "dora"}  # all served, at most two loaded
    order = ["net", "sql", "dora", "net", "tiny", "sql", "dora"]
    # What an LRU cache of two does from whatever earlier tests left loaded.
    resident, loads, evictions = list(health["resident"]), [], []
    for name in order:
        if name in resident or name == "tiny":
            resident = [n for n in resident if n != name] + [name] * (name != "tiny")
            continue
        if len(resident) == 2:
            evictions.append(resident.pop(0))
        resident.append(name)
        loads.append(name)
    before = len(capped.logs)
    for i, name in enumerate(order):
        q = QUESTIONS[i % len(QUESTIONS)]
        job = answer(capped, chat_job(capped, chat_answers, name, q))
        assert job.tokens == chat_answers[name, q][0], (i, name, q)
    logs = capped.logs[before:]
    assert [x.split(" ")[1] for x in logs if x.startswith("loaded ")] == loads
    assert [x.split(" ")[1] for x in logs if x.startswith("evicted ")] == evictions
    assert len(evictions) >= 4  # each time the least recently used
    assert raw(capped, "GET", "/health")[1]["resident"] == ["sql", "dora"]
    client = openai.OpenAI(base_url=capped.url + "/v1", api_key="unused", max_retries=0)
    q = QUESTIONS[0]
    r = client.chat.completions.create(**ask("net", q), temperature=0, max_tokens=N)
    assert r.choices[0].message.content == chat_answers["net", q][1]


def test_an_adapter_in_use_is_never_evicted(capped, chat_answers):
    """net and sql answer at length; dora waits for one of them to end, then takes its slot."""
    a = chat_job(capped, chat_answers, "net", QUESTIONS[0], 60)
    b = chat_job(capped, chat_answers, "sql", QUESTIONS[1], 60)
    c = chat_job(capped, chat_answers, "dora", QUESTIONS[2])
    before = len(capped.logs)
    engine = capped.engine
    engine.call(lambda: [engine.submit(j) for j in (a, b, c)])  # one pass of the worker
    first = c.events.get()
    assert first[0] == "text" and (a.done or b.done)  # dora waited for a row to end
    for job in (a, b, c):
        while (event := job.events.get())[0] == "text":
            pass
        assert event[0] == "end", event
    for job, name, q in ((a, "net", QUESTIONS[0]), (b, "sql", QUESTIONS[1])):
        want = chat_answers[name, q][0]
        assert job.tokens[: len(want)] == want, name  # its adapter stayed to the end
    logs = capped.logs[before:]
    evictions = [(i, x.split(" ")[1]) for i, x in enumerate(logs) if x.startswith("evicted ")]
    taken = [(i, gone) for i, gone in evictions if gone in ("net", "sql")]
    assert taken, logs  # dora's slot was net's or sql's
    for i, gone in taken:
        done = next(j for j, x in enumerate(logs) if x.startswith(f"{gone}: "))
        assert done < i, logs  # evicted only once its request had ended
    assert engine.busy == 0 and engine.waiting == 0


def test_a_run_gone_before_its_first_request_fails_that_request_only(
    capped, root, tmp_path, chat_answers
):
    copy = tmp_path / "gone"
    shutil.copytree(root / "sql", copy)
    assert raw(capped, "POST", "/v1/adapters", json.dumps({"path": str(copy)}))[0] == 200
    assert "gone" not in raw(capped, "GET", "/health")[1]["resident"]  # served, not loaded
    shutil.rmtree(copy)
    status, body = raw(capped, "POST", "/v1/chat/completions", json.dumps(ask("gone", "hi")))
    assert status == 500 and "cannot load gone" in body["error"]["message"], body
    job = answer(capped, chat_job(capped, chat_answers, "sql", QUESTIONS[0]))
    assert job.tokens == chat_answers["sql", QUESTIONS[0]][0]
    assert raw(capped, "DELETE", "/v1/adapters/gone")[0] == 200


def test_bad_max_adapters_is_a_one_line_error(root):
    for value in ("0", "-2", "two"):
        result = CliRunner().invoke(cli, ["serve", str(root / "net"), "--max-adapters", value])
        assert result.exit_code == 1, result.output
        assert result.output.strip().count("\n") == 0 and "--max-adapters" in result.output


# --- what is served, from the command line -----------------------------------------------


def test_runs_of_another_base_are_refused_naming_the_run(root, tmp_path):
    other = save_tiny_model_dir(
        tmp_path / "other", hidden_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    write_lora_run(
        tmp_path / "small",
        other,
        seed=3,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    result = CliRunner().invoke(cli, ["serve", str(root / "net"), str(tmp_path / "small")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "small" in result.output and "trained on" in result.output
    with pytest.raises(ModelError, match=r"small.*another base"):
        open_catalog([str(root / "net"), str(tmp_path / "small")], str(root / "tiny"))
    result = CliRunner().invoke(cli, ["serve", str(root / "net"), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--api-key" in result.output
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "not a run folder" in result.output
    shutil.copytree(root / "net", tmp_path / "twin" / "net")
    result = CliRunner().invoke(cli, ["serve", str(root / "net"), str(tmp_path / "twin" / "net")])
    assert result.exit_code == 1 and "two models would be served as net" in result.output


def test_macft_serve_answers_curl_and_stops_on_ctrl_c(root, chat_answers):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "macft", "serve", str(root / "net"), "--port", "0"]
    cmd += ["--max-adapters", "1"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        url = re.search(r"http://[\d.:]+", "".join(lines))[0]
        q = QUESTIONS[0]
        body = json.dumps(ask("net", q, temperature=0, max_tokens=N))
        out = subprocess.run(
            ["curl", "-sS", url + "/v1/chat/completions", "-d", body],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert json.loads(out)["choices"][0]["message"]["content"] == chat_answers["net", q][1]
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "net: " in rest and "tokens/s" in rest  # the request's log line
    assert "loaded net (1 of at most 1 resident)" in rest  # on its first request
    assert "stopped." in rest and "Traceback" not in rest
