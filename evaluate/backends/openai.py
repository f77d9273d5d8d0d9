"""Any OpenAI-compatible server (vLLM, llama-server, SGLang): concurrent requests through the
`openai` client, which retries 5xx / 429 / timeouts with exponential backoff (`max_retries`).

Never silently dropping a sample: a request that still fails after its retries stops the run with
an error naming the prompt (completions already made stay in the generation cache, so the next
run resumes). Reasoning models behind a reasoning parser return their thinking in
`reasoning_content` (llama-server, older vLLM) or `reasoning` (newer vLLM); when `content` is empty
the answer is read from there instead, and the sample records `answer_source: reasoning_content`
(the reference harness scored 87.6% of ARC as empty by reading `content` alone).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from moeprune import schema
from moeprune.errors import MoePruneError
from moeprune.evaluate.backends.base import Backend, BackendConfig
from moeprune.evaluate.reasoning import split_reasoning
from moeprune.evaluate.types import Completion

_REASONING_FIELDS = ("reasoning_content", "reasoning")


@dataclass
class ServedBackendConfig(BackendConfig):
    """What shapes requests to an OpenAI-compatible server (llama_cpp starts its own)."""

    concurrency: int = schema.knob(8, lambda v: v >= 1, "at least 1 request in flight")  # requests in flight
    max_retries: int = 5  # per request, on 5xx / 429 / timeouts, with backoff
    timeout_s: float = 1800.0
    thinking_budget_field: Optional[str] = None  # request field for the budget (vLLM: thinking_token_budget)
    extra_body: Dict[str, Any] = field(default_factory=dict)  # more request fields


@schema.schema("backend", "openai")
@dataclass
class OpenAIBackendConfig(ServedBackendConfig):
    name: str = "openai"
    base_url: Optional[str] = None  # the server's API root, e.g. http://127.0.0.1:8000/v1
    model: Optional[str] = None  # the served model name; null = the server's only model
    api_key_env: str = "OPENAI_API_KEY"


def request_identity(enable_thinking: bool = False, thinking_budget_field: str | None = None,
                     extra_body: dict | None = None, reasoning_start: str | None = None,
                     reasoning_end: str | None = None, **_transport_knobs) -> dict:
    """What shapes each request's output besides the server and model (part of the generation cache
    key); concurrency, retries and timeouts do not."""
    return {"enable_thinking": enable_thinking, "extra_body": dict(extra_body or {}),
            "reasoning": (reasoning_start, reasoning_end) if reasoning_end else None,
            "thinking_budget_field": thinking_budget_field}


class OpenAIBackend(Backend):
    runtime = ()  # the server holds the model

    def __init__(self, cfg: OpenAIBackendConfig | None = None, **knobs):
        from openai import OpenAI

        cfg = schema.make(OpenAIBackendConfig, cfg, knobs, "backend")
        base_url, concurrency, max_retries = cfg.base_url, cfg.concurrency, cfg.max_retries
        self.name, self.max_new_tokens = cfg.name, cfg.max_new_tokens  # every backend's knobs; the stage reads the limit
        if not base_url:
            raise MoePruneError("backend.base_url is not set: expected the server's OpenAI API root, "
                                "e.g. http://127.0.0.1:8000/v1")
        self.base_url, self.concurrency, self.max_retries = base_url, concurrency, max_retries
        self.chunk_size = 4 * concurrency  # enough prompts per chunk to keep every request slot busy
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(cfg.api_key_env) or "unused",
                             max_retries=max_retries, timeout=cfg.timeout_s)
        self._model = cfg.model
        self.enable_thinking, self.thinking_budget_field = cfg.enable_thinking, cfg.thinking_budget_field
        self.extra_body = dict(cfg.extra_body or {})
        self.markers = (cfg.reasoning_start, cfg.reasoning_end) if cfg.reasoning_end else None
        self.requests = request_identity(cfg.enable_thinking, cfg.thinking_budget_field, cfg.extra_body,
                                         cfg.reasoning_start, cfg.reasoning_end)

    @property
    def model(self) -> str:
        if self._model is None:  # a single-model server (llama-server, vLLM serve) names its one model
            try:
                models = self.client.models.list().data
            except Exception as e:
                raise MoePruneError(f"cannot list models at {self.base_url}: {type(e).__name__}: {e}") from None
            if not models:
                raise MoePruneError(f"{self.base_url} serves no model; set backend.model")
            self._model = models[0].id
        return self._model

    def identity(self) -> dict:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model, **self.requests}

    def close(self) -> None:
        self.client.close()

    def generate(self, prompts: list[str], max_new_tokens: int, *, chat: bool = False,
                 thinking_budget: int | None = None, sampler: dict | None = None) -> list[Completion]:
        sampler = sampler or {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
        body = dict(self.extra_body)
        if "top_k" in sampler:
            body["top_k"] = sampler["top_k"]  # not an OpenAI field; vLLM and llama-server read it
        if chat:
            body["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking, **body.get("chat_template_kwargs", {})}
        if thinking_budget and self.thinking_budget_field:
            body[self.thinking_budget_field] = thinking_budget
        common = dict(model=self.model, max_tokens=max_new_tokens, temperature=sampler.get("temperature", 0.0),
                      top_p=sampler.get("top_p", 1.0), extra_body=body)

        def one(i_prompt: tuple[int, str]) -> Completion:
            i, prompt = i_prompt
            try:
                if chat:
                    resp = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
                else:
                    resp = self.client.completions.create(prompt=prompt, **common)
            except Exception as e:  # after the client's own retries: stop the run, never drop the sample
                raise MoePruneError(f"{self.base_url}: request for prompt {i} failed after {self.max_retries} "
                                    f"retries: {type(e).__name__}: {str(e)[:300]}") from None
            return self._completion(resp, chat)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, enumerate(prompts)))

    def _completion(self, resp, chat: bool) -> Completion:
        if not resp.choices:
            raise MoePruneError(f"{self.base_url}: a response with no choices: {str(resp)[:300]}")
        choice = resp.choices[0]
        tokens = resp.usage.completion_tokens if resp.usage else None
        finish = choice.finish_reason or "stop"
        if not chat:
            return Completion(choice.text or "", tokens, finish)
        msg = choice.message
        content, extra = msg.content or "", (msg.model_extra or {})
        reasoning = next((extra[f] for f in _REASONING_FIELDS if extra.get(f)), "") or ""
        if self.markers and not reasoning:  # a server without a reasoning parser: split it ourselves
            reasoning, content = split_reasoning(content, *self.markers)
        if not content.strip() and reasoning.strip():
            return Completion(reasoning, tokens, finish, reasoning=reasoning, answer_source="reasoning_content")
        return Completion(content, tokens, finish, reasoning=reasoning)
