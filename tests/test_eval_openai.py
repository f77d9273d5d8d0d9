"""The openai backend against a real HTTP server on loopback: plain content, an answer left in
`reasoning_content`, a 500 then success, a truncated reply, a server that keeps failing; and a run
killed mid-way that resumes from the generation cache to the same summary."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate.backends.openai import OpenAIBackend
from moeprune.evaluate.benches.gsm8k import GSM8K
from moeprune.evaluate.bench_run import read_jsonl, run_bench

QUESTIONS = {  # keyword in the question -> how the server answers
    "apples": "content",  # the answer in `content`
    "pears": "reasoning",  # `content` empty, the answer only in `reasoning_content`
    "plums": "flaky",  # HTTP 500 first, then the answer
    "melons": "truncated",  # cut at max_tokens before any answer
}


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float = 0.0, always_fail: bool = False):
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay, self.always_fail = delay, always_fail
        self.requests: list[dict] = []
        self.failed_once: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                      "owned_by": "test"}]})

    def do_POST(self):
        srv: FakeServer = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append(req)
        time.sleep(srv.delay)
        prompt = req["messages"][-1]["content"]
        kind = "empty" if "figs" in prompt else next((v for k, v in QUESTIONS.items() if k in prompt), "content")
        number = prompt.split("NUMBER=")[1].split()[0]
        if srv.always_fail or (kind == "flaky" and prompt not in srv.failed_once):
            with srv.lock:
                srv.failed_once.add(prompt)
            return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
        message, finish, tokens = {"role": "assistant", "content": f"The total is {number}.\n#### {number}"}, "stop", 12
        if kind == "reasoning":
            message = {"role": "assistant", "content": "", "reasoning_content": f"Adding up gives {number}. #### {number}"}
        if kind == "empty":
            message = {"role": "assistant", "content": ""}
        if kind == "truncated":
            message, finish, tokens = {"role": "assistant", "content": "Let me think about this very carefully and"}, \
                "length", req["max_tokens"]
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake-model",
                         "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                         "usage": {"prompt_tokens": 20, "completion_tokens": tokens, "total_tokens": 20 + tokens}})


@pytest.fixture
def server():
    srv = FakeServer()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def gsm8k_file(path: Path, copies: int = 1) -> Path:
    """A GSM8K-format file whose questions tell the fake server how to answer."""
    rows = [{"question": f"How many {fruit} are there in box {i}? NUMBER={10 * i + j}",
             "answer": f"Count them.\n#### {10 * i + j}"}
            for i in range(copies) for j, fruit in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_content_reasoning_retry_and_truncation_are_scored_and_audited(server, tmp_path):
    bench = GSM8K(data={"path": str(gsm8k_file(tmp_path / "q.jsonl"))}, max_new_tokens=64)
    backend = OpenAIBackend(base_url=server.url, concurrency=4, max_retries=2)
    summary = run_bench(bench, backend, tmp_path / "out")
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "samples.jsonl")}
    content, reasoning, flaky, truncated = (rows[f"gsm8k/{j}"] for j in range(4))
    assert content["pass"] and content["answer_source"] == "content"
    assert reasoning["pass"] and reasoning["answer_source"] == "reasoning_content" and reasoning["reasoning"]
    assert flaky["pass"]
    assert not truncated["pass"] and truncated["finish_reason"] == "length" and truncated["tokens"] == 64
    assert summary["score"] == 0.75 and summary["n"] == 4
    audits = summary["audits"]
    assert audits["empty"] == 0 and audits["answer_from_reasoning"] == 1
    assert summary["rumination"]["truncated"] == 1 and summary["rumination"]["saturated_failed"] == 1
    assert any("reasoning_content" in f for f in summary["flags"])
    assert len(server.requests) == 5  # four prompts + the retried one: nothing dropped, nothing doubled
    req = server.requests[0]
    assert req["temperature"] == 0.0 and req["top_p"] == 1.0 and req["top_k"] == 0 and req["max_tokens"] == 64
    assert summary["model"]["model"] == "fake-model" and summary["data_hash"]


def test_empty_answers_above_the_threshold_are_flagged_loudly(server, tmp_path, caplog):
    path = tmp_path / "q.jsonl"
    rows = [("figs", 1), ("figs", 2), ("apples", 3)]  # the server answers questions about figs with nothing
    path.write_text("".join(json.dumps({"question": f"How many {f}? NUMBER={n}", "answer": f"#### {n}"}) + "\n"
                            for f, n in rows))
    bench = GSM8K(data={"path": str(path)}, max_new_tokens=32)
    summary = run_bench(bench, OpenAIBackend(base_url=server.url, concurrency=2), tmp_path / "out")
    assert summary["audits"]["empty"] == 2 and summary["score"] == pytest.approx(1 / 3)
    assert summary["flags"][0].startswith("EMPTY ANSWERS: 2/3 (66.7%)")
    assert "EMPTY ANSWERS" in caplog.text
    quiet = run_bench(bench, OpenAIBackend(base_url=server.url, concurrency=2), tmp_path / "out2", empty_threshold=0.9)
    assert quiet["flags"] == [] and quiet["audits"]["empty"] == 2


def test_a_server_that_keeps_failing_stops_the_run_instead_of_dropping_samples(tmp_path):
    srv = FakeServer(always_fail=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        bench = GSM8K(data={"path": str(gsm8k_file(tmp_path / "q.jsonl"))})
        with pytest.raises(MoePruneError, match="failed after 1 retries.*InternalServerError"):
            run_bench(bench, OpenAIBackend(base_url=srv.url, model="fake-model", concurrency=2, max_retries=1),
                      tmp_path / "out")
        assert not (tmp_path / "out" / "summary.json").exists()
    finally:
        srv.shutdown()


def test_missing_base_url_fails_clearly():
    with pytest.raises(MoePruneError, match="backend.base_url is not set"):
        OpenAIBackend(base_url=None)


def _cached_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    except sqlite3.OperationalError:  # the table does not exist yet
        return 0


def test_a_run_killed_mid_way_resumes_to_the_same_summary(tiny_gemma4, tmp_path):
    srv = FakeServer(delay=0.3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    data = gsm8k_file(tmp_path / "q.jsonl", copies=3)  # 12 prompts, 4 per cached chunk at concurrency 1
    cache = tmp_path / "cache"
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    args = [sys.executable, "-m", "moeprune", "stage=evaluate_base", f"model.path={tiny_gemma4}", "backend=openai",
            f"backend.base_url={srv.url}", "backend.concurrency=1", "bench=gsm8k_100", f"bench.data.path={data}",
            "bench.n=null", "bench.max_new_tokens=64"]
    try:
        proc = subprocess.Popen([*args, f"hydra.run.dir={tmp_path / 'killed'}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _cached_rows(cache / "generations.sqlite") < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        done_before = _cached_rows(cache / "generations.sqlite")
        assert 4 <= done_before < 12, "the run must be killed after its first chunk and before its end"
        assert not (cache / "evaluate_base").exists() or not any((cache / "evaluate_base").glob("*/summary.json"))

        resumed = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'resumed'}"], env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        out = Path(json.loads((tmp_path / "resumed" / "run.json").read_text())["stages"]["evaluate_base"]["artifact"])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["generation_cache"]["reused"] == done_before

        reference = run_bench(GSM8K(name="gsm8k_100", data={"path": str(data)}, n=None, max_new_tokens=64),
                              OpenAIBackend(base_url=srv.url, concurrency=4), tmp_path / "ref")
        drop = ("generation_cache", "settings", "model")
        assert {k: v for k, v in summary.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}
        assert read_jsonl(out / "samples.jsonl") == read_jsonl(tmp_path / "ref" / "samples.jsonl")
    finally:
        srv.shutdown()
