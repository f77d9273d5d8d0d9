"""A GGUF through llama.cpp: starts `llama-server` (the toolchain the quant stage builds from the
llama.cpp sources in the llama-cpp-python sdist, `moeprune.quant.toolchain`) on a free loopback port and talks to it through
the openai backend, so both paths share one request, retry and reasoning-parsing code.

The server runs with `--reasoning-format deepseek` (thinking goes to `reasoning_content`) and, when
the bench sets a thinking budget, `--reasoning-budget` (llama-server takes it per server, not per
request). `backend.server_args` adds any other flags (context size, GPU layers, ...).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from moeprune import artifacts, schema
from moeprune.errors import MoePruneError
from moeprune.evaluate.backends.base import Backend
from moeprune.evaluate.backends.openai import OpenAIBackend, ServedBackendConfig, request_identity
from moeprune.evaluate.types import Completion

log = logging.getLogger("moeprune")


@schema.schema("backend", "llama_cpp")
@dataclass
class LlamaCppBackendConfig(ServedBackendConfig):
    name: str = "llama_cpp"
    gguf: Optional[str] = None  # the GGUF file; null = the single *.gguf in the model dir
    concurrency: int = schema.knob(2, lambda v: v >= 1, "at least 1 request in flight")  # llama-server's slots
    server_args: List[str] = field(default_factory=list)  # more llama-server flags


def find_gguf(model_path: Path, gguf: str | None) -> Path:
    if gguf:
        p = Path(gguf).expanduser()
        if not p.is_file():
            raise MoePruneError(f"backend.gguf={p}: no such file; expected a .gguf model")
        return p
    p = Path(model_path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    found = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if len(found) != 1:
        raise MoePruneError(f"{p}: expected exactly one .gguf file (found {len(found)}); set backend.gguf")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppBackend(Backend):
    runtime = ("model_dir",)  # the quant dir (or a dir holding one GGUF)

    def __init__(self, model_dir: Path, cfg: LlamaCppBackendConfig | None = None, startup_timeout_s: float = 300.0,
                 **knobs):
        cfg = schema.make(LlamaCppBackendConfig, cfg, knobs, "backend")
        self.name, self.max_new_tokens = cfg.name, cfg.max_new_tokens  # every backend's knobs; the stage reads the limit
        self.gguf = find_gguf(model_dir, cfg.gguf)
        self.concurrency, self.server_args = cfg.concurrency, [str(a) for a in (cfg.server_args or [])]
        self.chunk_size = 4 * self.concurrency  # enough prompts per chunk to keep every server slot busy
        self.startup_timeout_s = startup_timeout_s
        # what the OpenAI client of the started server is built with
        self.openai_knobs = {k: getattr(cfg, k) for k in ("max_retries", "timeout_s", "thinking_budget_field",
                                                          "extra_body", "reasoning_start", "reasoning_end",
                                                          "enable_thinking")}
        self._server: subprocess.Popen | None = None
        self._budget: int | None = None
        self._client: OpenAIBackend | None = None

    def identity(self) -> dict:
        return {"backend": "llama_cpp", "gguf": artifacts.hash_path(self.gguf), "server_args": self.server_args,
                **request_identity(**self.openai_knobs)}

    def _start(self, thinking_budget: int | None) -> OpenAIBackend:
        if self._client is not None and self._budget == thinking_budget:
            return self._client
        self.close()
        from moeprune.quant import toolchain

        server = toolchain.ensure().tool("llama-server")
        port = _free_port()
        cmd = [str(server), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(self.concurrency), "--reasoning-format", "deepseek",
               # Repacking quantized weights for the CPU segfaults this llama-server at load on the
               # toy MoE's K-quant / Q8_0 / IQ files; without it they load and compute the same.
               "--no-repack", *self.server_args]
        if thinking_budget:
            cmd += ["--reasoning-budget", str(thinking_budget)]
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self._server = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                tail = Path(self._log.name).read_text(errors="replace")[-2000:]
                raise MoePruneError(f"llama-server exited ({self._server.returncode}) on {self.gguf}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            self.close()
            raise MoePruneError(f"llama-server did not become healthy within {self.startup_timeout_s} s")
        self._budget = thinking_budget
        self.url = f"http://127.0.0.1:{port}"  # llama-server's own endpoints (/completion, /tokenize)
        self._client = OpenAIBackend(base_url=f"{self.url}/v1", concurrency=self.concurrency,
                                     **self.openai_knobs)
        return self._client

    def generate(self, prompts: list[str], max_new_tokens: int, *, chat: bool = False,
                 thinking_budget: int | None = None, sampler: dict | None = None) -> list[Completion]:
        return self._start(thinking_budget).generate(prompts, max_new_tokens, chat=chat, sampler=sampler)

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._server.kill()
        self._server, self._client = None, None
