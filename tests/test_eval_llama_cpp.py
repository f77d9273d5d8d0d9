"""The llama_cpp backend: a real GGUF (the tiny Gemma 4, converted by the quant toolchain) served by
llama-server and queried through the openai backend. Builds the llama.cpp tools on first use."""

from __future__ import annotations

import json

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate.backends.llama_cpp import LlamaCppBackend, find_gguf

pytestmark = pytest.mark.llamacpp


def test_find_gguf_names_what_is_missing(tmp_path):
    with pytest.raises(MoePruneError, match="expected exactly one .gguf file \\(found 0\\)"):
        find_gguf(tmp_path, None)
    with pytest.raises(MoePruneError, match="backend.gguf=.*no such file"):
        find_gguf(tmp_path, str(tmp_path / "x.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path, None) == tmp_path / "m.gguf"


def test_llama_server_generates_through_the_openai_backend(tmp_path):
    from quant_support import save_gguf_ready_gemma4

    from moeprune import artifacts
    from moeprune.quant import gguf_tools, toolchain

    tc = toolchain.ensure()  # built on first use (minutes), as the quant tests do: never a silent skip
    model = save_gguf_ready_gemma4(tmp_path / "hf")
    gguf_tools.convert(tc, model, tmp_path / "gguf" / "model.gguf")
    backend = LlamaCppBackend(tmp_path / "gguf", concurrency=2, server_args=["-c", "512"])
    prompts = ["ADD:12+34=", "BOOL:T&F="]
    try:
        comps = backend.generate(prompts, 8)
    finally:
        backend.close()
    assert len(comps) == 2 and all(c.tokens is not None and 0 < c.tokens <= 8 for c in comps)
    assert all(c.finish_reason in ("stop", "length") for c in comps)
    assert backend.identity()["gguf"] == artifacts.hash_path(tmp_path / "gguf" / "model.gguf")


def test_identity_keys_every_request_knob_so_the_generation_cache_cannot_mix_them(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    ids = [LlamaCppBackend(tmp_path, **kw).identity() for kw in (
        {}, {"enable_thinking": True}, {"extra_body": {"repeat_penalty": 5.0}},
        {"reasoning_start": "<think>", "reasoning_end": "</think>"}, {"thinking_budget_field": "thinking_budget"},
        {"server_args": ["-c", "512"]})]
    assert len({json.dumps(i, sort_keys=True) for i in ids}) == len(ids)
    assert LlamaCppBackend(tmp_path, concurrency=4).identity() == ids[0]  # how many in flight changes nothing
