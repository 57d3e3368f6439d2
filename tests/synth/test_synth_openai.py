"""The openai backend against a real HTTP server on 127.0.0.1 (no client mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import repo
from fakeserver import FakeOpenAIServer

from effilm.errors import EffilmError
from effilm.synth.recipe import load_recipe
from effilm.synth.runner import Run, read_records

SRC = str(repo.SRC)


def recipe_for(server, records=4, shard_size=100, budget=None, **openai):
    cfg = {"base_url": server.base_url, "model": "teacher", "backoff_base_s": 0.01, "backoff_max_s": 0.05,
           "timeout_s": 5.0, "concurrency": 4, **openai}
    return load_recipe(None, {"backend": "openai", "records": records, "shard_size": shard_size, "openai": cfg,
                              "budget": budget or {}})


def run(recipe, out, **kw):
    return Run(recipe, out, log=lambda m: None, **kw).run()


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


def test_retries_429_500_timeouts_and_malformed_replies(server, tmp_path):
    server.script = ["429", "500", "malformed", "empty", "slow"]
    server.slow_s = 1.0
    recipe = recipe_for(server, records=3, concurrency=1, timeout_s=0.3)
    summary = run(recipe, tmp_path / "out")
    assert summary["complete"] and summary["records"] == {"records": 3}
    assert summary["usage"]["retries"] == 5
    assert summary["usage"]["errors"] == {"HTTP 429": 1, "HTTP 500": 1, "malformed reply": 2, "timeout": 1}
    recs = list(read_records(tmp_path / "out" / "records"))
    assert [r["text"] for r in recs] == [FakeOpenAIServer.answer_for(r["provenance"]["prompt"]) for r in recs]
    p = recs[0]["provenance"]
    assert p["backend"] == "openai" and p["model"] == "teacher" and len(p["injected_words"]) == 3
    assert p["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 600}
    assert recs[0]["n_tokens"]["prompt"] == len(p["prompt"].split())


def test_retry_after_is_honoured(server, tmp_path):
    server.script, server.retry_after = ["429"], "1"
    run(recipe_for(server, records=1, concurrency=1), tmp_path / "out")
    t = [e["t"] for e in server.log]
    assert len(t) == 2 and t[1] - t[0] >= 0.9


def test_gives_up_with_a_clear_error(server, tmp_path):
    server.default = "500"
    with pytest.raises(EffilmError, match="failed after 3 attempts .HTTP 500"):
        run(recipe_for(server, records=1, max_retries=2), tmp_path / "out")


def test_request_budget_caps_spending_and_a_rerun_resumes(server, tmp_path):
    out = tmp_path / "out"
    s1 = run(recipe_for(server, records=10, shard_size=4, budget={"max_requests": 6}), out)
    assert not s1["complete"] and "request cap" in s1["stopped"]
    assert len(server.log) == 6 and s1["usage"]["requests"] == 6
    assert s1["records"] == {"records": 4}  # one whole shard; the other 2 replies wait in the cache
    s2 = run(recipe_for(server, records=10, shard_size=4), out)
    assert s2["complete"] and s2["usage"]["cache_hits"] == 2 and s2["skipped_shards"] == 1
    assert len(server.log) == 10, "a resumed run must not pay twice"
    ids = [r["id"] for r in read_records(out / "records")]
    assert len(ids) == len(set(ids)) == 10


def test_token_budget_is_never_exceeded(server, tmp_path):
    s = run(recipe_for(server, records=20, budget={"max_tokens": 3000}), tmp_path / "out")
    assert "token cap" in s["stopped"]
    assert 0 < s["usage"]["tokens"] <= 3000 and len(server.log) < 20


def test_cache_means_a_rerun_sends_nothing(server, tmp_path):
    out = tmp_path / "out"
    run(recipe_for(server, records=5), out)
    first = [r["text"] for r in read_records(out / "records")]
    (out / "manifest.json").unlink()
    for f in (out / "records").iterdir():
        f.unlink()
    s = run(recipe_for(server, records=5), out)
    assert len(server.log) == 5 and s["usage"]["cache_hits"] == 5 and s["usage"]["requests"] == 0
    assert [r["text"] for r in read_records(out / "records")] == first


def test_dry_run_counts_requests_and_tokens_and_cache(server, tmp_path):
    out = tmp_path / "out"
    run(recipe_for(server, records=3, shard_size=3), out)
    plan = Run(recipe_for(server, records=8, shard_size=3, budget={"max_requests": 2}), out,
               log=lambda m: None).run(dry_run=True)
    assert plan["requests"] == 5 and plan["records_to_write"] == 5 and plan["cached"] == 0
    assert plan["max_tokens"] > 5 * 600 and plan["fits_budget"] is False
    assert len(server.log) == 3


def test_api_key_comes_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "s3cret")
    Run(recipe_for(server, records=1), tmp_path / "o", api_key_env="MY_TEACHER_KEY", log=lambda m: None).run()
    assert server.log[0]["auth"] == "Bearer s3cret"


def test_resume_after_a_killed_run_loses_nothing_and_duplicates_nothing(server, tmp_path):
    server.latency_s = 0.05
    out, n, conc = tmp_path / "out", 40, 2
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(
        f'name = "kill"\nbackend = "openai"\nrecords = {n}\nshard_size = 5\n'
        'topics = ["rain", "tides", "gears"]\nvocabulary = ["kite", "lamp", "moss"]\ninject_words = 1\n'
        '[[audiences]]\nid = "kids"\ninstruction = "For children."\n'
        '[[styles]]\nid = "plain"\ninstruction = "Plainly."\n'
        '[[kinds]]\nid = "lesson"\ninstruction = "Teach {topic}."\n'
        f'[openai]\nbase_url = "{server.base_url}"\nconcurrency = {conc}\n')
    cmd = [sys.executable, "-m", "effilm", "synth", str(recipe_path), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(server.log) < 17 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((out / "manifest.json").read_text())["streams"]["records"]
    assert not partial.get("complete") and len(partial["shards"]) >= 1
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    recs = list(read_records(out / "records"))
    assert sorted(r["id"] for r in recs) == [f"kill-0-{i:09d}" for i in range(n)]
    assert all(r["text"] == FakeOpenAIServer.answer_for(r["provenance"]["prompt"]) for r in recs)
    paid = server.answered()
    assert len(set(paid)) == n
    assert len(paid) - n <= conc, "only requests in flight at the kill may be paid twice"


def test_an_unreachable_server_is_reported_as_such_not_as_the_cap(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = load_recipe(None, {"backend": "openai", "records": 2, "budget": {"max_requests": 3},
                                "openai": {"base_url": f"http://127.0.0.1:{port}/v1", "concurrency": 1,
                                           "backoff_base_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 2.0}})
    logs: list[str] = []
    summary = Run(recipe, tmp_path / "o", log=logs.append).run()
    assert "transport error: ConnectError on every one of" in summary["stopped"]
    assert "request cap reached" in summary["stopped"]  # the cap is still named, after the cause
    assert any("check the server" in m for m in logs) and not any("larger budget" in m for m in logs)
