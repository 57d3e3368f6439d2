"""``effilm serve`` end to end: real subprocesses, real HTTP on 127.0.0.1, the real engine."""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from engine_fixtures import WORDS
from serve_harness import MAX_CONTEXT, SERVED, ServerProcess, make_model_dir, sse_events

from effilm.cli import main

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def engine(model_dir):
    import torch

    from effilm.inference.engine import Engine

    torch.set_num_threads(1)
    return Engine.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--api-key-env", "EFFILM_TEST_KEY", "--max-concurrency", "16",
                        "--max-body-bytes", "20000", env={"EFFILM_TEST_KEY": KEY})
    yield srv
    assert srv.stop() == 0


def greedy(engine, prompt, n: int):
    from effilm.inference.engine import SamplingParams

    return engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0.0))[0]


def post(srv, path, body, headers=AUTH, **kw):
    return httpx.post(srv.base_url + path, json=body, headers=headers, timeout=60, **kw)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n)]


# ----- basics -------------------------------------------------------------------------------------
def test_health_is_open_and_everything_else_needs_the_key(server):
    assert server.health()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.base_url + "/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = post(server, "/completions", {"model": SERVED, "prompt": "the", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401
    r = httpx.get(server.base_url + "/models", headers=AUTH)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [SERVED] and r.json()["data"][0]["max_model_len"] == MAX_CONTEXT
    assert httpx.get(f"{server.base_url}/models/{SERVED}", headers=AUTH).json()["id"] == SERVED
    assert httpx.get(f"{server.base_url}/models/other", headers=AUTH).json()["error"]["code"] == "model_not_found"


def test_completion_equals_the_engine_and_counts_usage(server, engine):
    r = post(server, "/completions", {"model": SERVED, "prompt": "the cat sat on", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body, want = r.json(), greedy(engine, "the cat sat on", 12)
    assert body["object"] == "text_completion" and body["model"] == SERVED
    assert body["choices"][0]["text"] == want.text and body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": len(want.token_ids),
                             "total_tokens": want.prompt_tokens + len(want.token_ids)}
    ids = engine.encode("the cat sat on")  # token-id prompts work too
    r = post(server, "/completions", {"model": SERVED, "prompt": ids, "max_tokens": 12, "temperature": 0})
    assert r.json()["choices"][0]["text"] == want.text


def test_sampling_parameters_reach_the_engine(server, engine):
    from effilm.inference.engine import SamplingParams

    body = {"model": SERVED, "prompt": "the garden", "max_tokens": 12, "temperature": 1.5, "top_k": 50, "seed": 7}
    texts = [post(server, "/completions", {**body, "seed": seed}).json()["choices"][0]["text"] for seed in (7, 7, 8)]
    want = engine.generate(["the garden"], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, seed=7))[0]
    assert texts[0] == texts[1] == want.text and texts[2] != texts[0]
    greedy_text = greedy(engine, "the garden", 12).text
    stop = greedy_text[len(greedy_text) // 2:][:2]
    r = post(server, "/completions", {**body, "temperature": 0, "stop": [stop]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["text"] == greedy_text[:greedy_text.index(stop)]


def test_streaming_completion_and_chat(server, engine):
    body = {"model": SERVED, "prompt": "river stone", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.base_url + "/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    want = greedy(engine, "river stone", 10)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert [c["choices"][0]["finish_reason"] for c in chunks].count(want.finish_reason) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want.token_ids)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the garden"}]
    want = greedy(engine, engine.chat_prompt(messages), 9)
    r = post(server, "/chat/completions", {"model": SERVED, "messages": messages, "max_tokens": 9, "temperature": 0})
    msg = r.json()["choices"][0]
    assert r.json()["object"] == "chat.completion" and msg["message"] == {"role": "assistant", "content": want.text}
    assert r.json()["usage"]["prompt_tokens"] == len(engine.chat_prompt(messages))
    with httpx.stream("POST", server.base_url + "/chat/completions", headers=AUTH, timeout=60,
                      json={"model": SERVED, "messages": messages, "max_tokens": 9, "temperature": 0, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == want.finish_reason
    assert "usage" not in events[1]  # only sent when stream_options.include_usage asks for it
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == want.text


def test_sixteen_parallel_requests_are_batched_and_all_correct(server, engine):
    texts = prompts(16)
    want = [greedy(engine, p, 6 + i % 5).text for i, p in enumerate(texts)]
    assert len(set(want)) > 4, "the check needs prompts whose completions differ"
    before = server.health()["batches_run"]

    def one(i):
        body = {"model": SERVED, "prompt": texts[i], "max_tokens": 6 + i % 5, "temperature": 0}
        if i % 2:
            with httpx.stream("POST", server.base_url + "/completions", json={**body, "stream": True}, headers=AUTH,
                              timeout=120) as r:
                return "".join(e["choices"][0]["text"] for e in sse_events(r.iter_lines()) if e != "[DONE]")
        return post(server, "/completions", body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    assert got == want
    batches = server.health()["batches_run"] - before
    assert batches < 16, "concurrent requests should share engine batches"


# ----- bad requests -------------------------------------------------------------------------------
LONG = " ".join(["seven"] * (MAX_CONTEXT + 10))
BAD = [
    ("malformed json", b'{"model": "tiny", "prompt": ', 400, None),
    ("not an object", [1, 2], 400, None),
    ("missing prompt", {"model": SERVED, "max_tokens": 3}, 400, "prompt"),
    ("missing model", {"prompt": "the", "max_tokens": 3}, 400, "model"),
    ("prompt wrong type", {"model": SERVED, "prompt": 5}, 400, "prompt"),
    ("max_tokens wrong type", {"model": SERVED, "prompt": "the", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature wrong type", {"model": SERVED, "prompt": "the", "temperature": "hot"}, 400, "temperature"),
    ("stream wrong type", {"model": SERVED, "prompt": "the", "stream": "yes"}, 400, "stream"),
    ("bool as int", {"model": SERVED, "prompt": "the", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens above context", {"model": SERVED, "prompt": "the", "max_tokens": MAX_CONTEXT + 1}, 400, "max_tokens"),
    ("prompt longer than context", {"model": SERVED, "prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("negative temperature", {"model": SERVED, "prompt": "the", "temperature": -0.5}, 400, "temperature"),
    ("top_p out of range", {"model": SERVED, "prompt": "the", "top_p": 0}, 400, "top_p"),
    ("token id outside vocab", {"model": SERVED, "prompt": [1, 10**6]}, 400, "prompt"),
    ("unknown field", {"model": SERVED, "prompt": "the", "max_token": 3}, 400, "max_token"),
    ("unsupported n", {"model": SERVED, "prompt": "the", "n": 2}, 400, "n"),
    ("unknown model", {"model": "gpt-4", "prompt": "the"}, 404, "model"),
    ("oversized body", {"model": SERVED, "prompt": "x" * 30000}, 413, None),
    ("json nested very deep", b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ("json nested past the limit", b'{"model": "tiny", "prompt": "the", "metadata": ' + b"[" * 40 + b"]" * 40 + b"}",
     400, None),
    ("integer of thousands of digits", b'{"model": "tiny", "prompt": "the", "seed": ' + b"9" * 5000 + b"}", 400, None),
    ("lone surrogate in the prompt", b'{"model": "tiny", "prompt": "the \\ud800 end"}', 400, None),
    ("infinite temperature", b'{"model": "tiny", "prompt": "the", "temperature": Infinity}', 400, None),
    ("temperature out of float range", b'{"model": "tiny", "prompt": "the", "temperature": 1e999}', 400, None),
    ("temperature above 2", {"model": SERVED, "prompt": "the", "temperature": 2.5}, 400, "temperature"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests_get_openai_errors(server, name, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server.base_url + "/completions", headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if "context" in name:
        assert err["code"] == "context_length_exceeded" and str(MAX_CONTEXT) in err["message"]


BAD_CHAT = [
    ("missing messages", {"model": SERVED}, "messages"),
    ("messages not a list", {"model": SERVED, "messages": "hi"}, "messages"),
    ("bad role", {"model": SERVED, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("content wrong type", {"model": SERVED, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("chat prompt too long", {"model": SERVED, "messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("max_completion_tokens above context",
     {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6},
     "max_completion_tokens"),
]


@pytest.mark.parametrize("name,body,param", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_requests_get_openai_errors(server, name, body, param):
    r = post(server, "/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_server_keeps_serving_after_bad_requests(server, engine):
    for _ in range(3):
        httpx.post(server.base_url + "/completions", content=b"\xff\xfe garbage", headers=AUTH)
    r = httpx.post(server.base_url + "/completions", content=b"x" * 50000,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.base_url + "/nope", headers=AUTH).json()["error"]["code"] == "not_found"
    assert httpx.get(server.base_url + "/completions", headers=AUTH).status_code == 405
    r = post(server, "/completions", {"model": SERVED, "prompt": "blue house", "max_tokens": 5, "temperature": 0})
    assert r.json()["choices"][0]["text"] == greedy(engine, "blue house", 5).text
    assert _wait_for(lambda: server.health()["active"] == server.health()["waiting"] == 0)


# ----- load, disconnects, shutdown (an engine slowed to 20 ms a step) -------------------------------
def _stream_first_chunk(srv, body, keep_open: threading.Event | None = None):
    with httpx.stream("POST", srv.base_url + "/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                if keep_open is not None:
                    keep_open.wait(30)  # the stream stays open while we wait (nothing is read)
                break  # leaving the iterator closes the connection: a client gone mid-stream


def _wait_for(pred, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_requests_with_a_body_must_be_json_and_bad_bodies_log_no_traceback(server):
    body = json.dumps({"model": SERVED, "prompt": "the", "max_tokens": 2})
    for ctype, status in ((None, 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                          ("application/json; charset=utf-8", 200), ("Application/JSON", 200)):
        headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
        r = httpx.post(server.base_url + "/completions", content=body.encode(), headers=headers, timeout=60)
        assert r.status_code == status, (ctype, r.text)
        if status == 415:
            assert r.json()["error"]["code"] == "unsupported_media_type"
    assert "Traceback" not in server.log_path.read_text()  # the bad bodies above (and BAD) were 4xx, not crashes


@pytest.fixture(scope="module")
def timed_server(model_dir):
    srv = ServerProcess(model_dir, "--header-timeout-s", "1", "--body-timeout-s", "2", "--max-connections", "40")
    yield srv
    assert srv.stop() == 0


def _closed_within(sock, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (None: still open after ``seconds``)."""
    sock.settimeout(0.1)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


def test_stalled_connections_are_closed_while_requests_are_served(timed_server):
    host, port = timed_server.url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(20):  # slowloris: half of a request's headers, then nothing
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        stalled.append(s)
    body = socket.create_connection((host, int(port)))  # complete headers, a body that never finishes
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")
    r = httpx.post(timed_server.base_url + "/completions", json={"model": SERVED, "prompt": "the", "max_tokens": 3},
                   timeout=30)  # served while the stalled connections wait
    assert r.status_code == 200, r.text
    waits = [_closed_within(s, 4.0) for s in stalled]
    assert all(w is not None for w in waits), waits  # every one closed: none is held forever
    assert _closed_within(body, 4.0) is not None
    for s in [*stalled, body]:
        s.close()
    assert httpx.get(timed_server.url + "/health", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def slow_server(model_dir):
    """One slot, one queue place, 50 ms per engine step; the SIGTERM test ends it."""
    srv = ServerProcess(model_dir, "--max-concurrency", "1", "--max-queue", "1", "--retry-after-s", "2",
                        step_delay=0.05)
    yield srv
    assert srv.stop() == 0


def test_overload_queues_within_bound_then_429_and_disconnect_frees_the_slot(slow_server):
    srv = slow_server
    body = {"model": SERVED, "prompt": "the cat", "max_tokens": 240, "temperature": 0}  # >= 12 s at 50 ms/step
    release = threading.Event()
    holder = threading.Thread(target=_stream_first_chunk, args=(srv, body, release))
    holder.start()  # occupies the only slot
    assert _wait_for(lambda: srv.health()["active"] == 1)
    queued = ThreadPoolExecutor(1).submit(post, srv, "/completions", {**body, "max_tokens": 3}, {})
    assert _wait_for(lambda: srv.health()["waiting"] == 1)
    r = post(srv, "/completions", {**body, "max_tokens": 3}, {})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    release.set()  # the streaming client goes away mid-stream: its slot frees, the queued one runs
    t0 = time.monotonic()
    holder.join(30)
    done = queued.result(timeout=30)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - t0 < 6, "the disconnected stream kept its slot"
    assert _wait_for(lambda: srv.health()["active"] == 0)


def test_a_non_streaming_client_that_gives_up_frees_its_slot(slow_server):
    body = {"model": SERVED, "prompt": "the cat", "max_tokens": 240, "temperature": 0}  # >= 12 s at 50 ms/step
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.base_url + "/completions", json=body, timeout=1.0)
    assert _wait_for(lambda: slow_server.health()["active"] == 0, timeout_s=10)
    assert time.monotonic() - t0 < 8, "the abandoned request kept generating"


def test_sigterm_finishes_in_flight_requests_then_exits_zero(slow_server):
    srv = slow_server
    body = {"model": SERVED, "prompt": "green tree", "max_tokens": 60, "temperature": 0, "stream": True}
    events: list = []
    started = threading.Event()

    def client():
        with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                events.append(line)

    t = threading.Thread(target=client)
    t.start()
    assert started.wait(30)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no new connections while the stream finishes
        httpx.get(srv.url + "/health", timeout=2)
    assert t.is_alive(), "the in-flight stream (60 steps of 50 ms) should still be running"
    t.join(60)
    parsed = sse_events(events)
    assert parsed[-1] == "[DONE]" and parsed[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) > 0 for e in parsed[:-1]) > 1
    assert srv.proc.wait(timeout=30) == 0


# ----- clients: the official openai package and effilm's own synth backend --------------------------
def test_official_openai_client(server, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [SERVED]
    out = client.completions.create(model=SERVED, prompt="the cat sat on", max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(engine, "the cat sat on", 12).text and out.usage.completion_tokens == 12
    messages = [{"role": "user", "content": "water light"}]
    want = greedy(engine, engine.chat_prompt(messages), 7).text
    stream = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=7, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED, prompt="the", temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_synth_openai_backend_against_effilm_server(server, engine, tmp_path, monkeypatch, endpoint):
    from effilm.synth.recipe import load_recipe
    from effilm.synth.runner import Run, read_records

    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(
        'name = "own"\nbackend = "openai"\nrecords = 4\nshard_size = 2\n'
        'topics = ["rain", "gears"]\nvocabulary = ["kite", "lamp", "moss"]\ninject_words = 1\n'
        '[[audiences]]\nid = "kids"\ninstruction = "For children."\n'
        '[[styles]]\nid = "plain"\ninstruction = "Plainly."\n'
        '[[kinds]]\nid = "lesson"\ninstruction = "Teach {topic}."\n'
        '[sampling]\ntemperature = 0.0\ntop_p = 1.0\nmax_tokens = 8\n'
        f'[openai]\nbase_url = "{server.base_url}"\nmodel = "{SERVED}"\nendpoint = "{endpoint}"\nconcurrency = 4\n'
        'api_key_env = "SYNTH_KEY"\n')
    monkeypatch.setenv("SYNTH_KEY", KEY)
    summary = Run(load_recipe(recipe_path), tmp_path / "out", api_key_env="SYNTH_KEY", log=lambda m: None).run()
    assert summary["complete"], summary
    recs = list(read_records(tmp_path / "out" / "records"))
    assert len(recs) == 4
    for rec in recs:
        prompt = rec["provenance"]["prompt"]
        ids = engine.chat_prompt([{"role": "user", "content": prompt}]) if endpoint == "chat" else prompt
        assert rec["text"] == greedy(engine, ids, 8).text
        assert rec["n_tokens"]["prompt"] == (len(ids) if endpoint == "chat" else len(engine.encode(prompt)))


# ----- command line -------------------------------------------------------------------------------
def test_cli_errors_are_one_line(model_dir, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert main(["serve", str(model_dir), "--api-key-env", "NO_SUCH_KEY_VAR"]) == 2
    assert "NO_SUCH_KEY_VAR is not set" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", str(model_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--max-concurrency", "0"]) == 2
    assert "max_concurrency" in capsys.readouterr().err


def test_serve_help_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "-h"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key-env", "--max-concurrency", "--max-queue", "--max-body-bytes"):
        assert flag in out
