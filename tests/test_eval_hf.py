"""The hf backend on a tiny random Gemma 4: batched greedy generation equals one-at-a-time
generation, the thinking budget forces the end-of-thinking marker, reasoning is split off."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from moeprune.errors import MoePruneError
from moeprune.evaluate.backends.hf import HFBackend, ThinkingBudget

PROMPTS = ["ADD:12+34=", "BOOL:T&F=", "PY:a=4;b=a+3;print(b*2)", "TXT:rev planet="]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from conftest import save_tiny_gemma4

    return HFBackend(save_tiny_gemma4(tmp_path_factory.mktemp("m") / "tiny"), device="cpu", batch_size=4)


def test_batched_generation_matches_one_prompt_at_a_time(backend):
    batched = backend.generate(PROMPTS, 6)
    single = [backend.generate([p], 6)[0] for p in PROMPTS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.tokens <= 6 and c.finish_reason in ("stop", "length") for c in batched)


@pytest.mark.parametrize("end", ["=", "=+"])
def test_thinking_budget_forces_the_end_marker(backend, end):
    tok, model = backend.tokenizer, backend.model
    end_ids = tok.encode(end, add_special_tokens=False)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    L = enc["input_ids"].shape[1]
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                         logits_processor=LogitsProcessorList([ThinkingBudget(L, 3, end_ids)]))
    for row in out[:, L:].tolist():
        closed_early = end_ids[-1] in row[:3]
        assert closed_early or row[3:3 + len(end_ids)] == end_ids, row


def test_thinking_budget_spares_rows_that_closed_their_thinking_themselves():
    prompt_len, end = 4, [7, 9]  # a two-token end marker, budget 3 tokens
    budget = ThinkingBudget(prompt_len, 3, end)
    ids = torch.tensor([[1, 1, 1, 1, 5, 7, 9], [1, 1, 1, 1, 5, 6, 6]])  # row 0 closes with its 3rd token
    for n in range(3):  # generate() calls the processor at every step
        budget(ids[:, :prompt_len + n], torch.zeros(2, 12))
    scores = budget(ids, torch.zeros(2, 12))  # 3 generated: the budget is spent, k = 0
    assert torch.equal(scores[0], torch.zeros(12)), "a row that closed its thinking is not forced"
    assert scores[1].argmax() == 7 and torch.isinf(scores[1]).sum() == 11  # the marker's first token
    scores = budget(torch.cat([ids, torch.tensor([[3], [7]])], 1), torch.zeros(2, 12))  # k = 1
    assert torch.equal(scores[0], torch.zeros(12)) and scores[1].argmax() == 9 and torch.isinf(scores[1]).sum() == 11


def test_reasoning_is_split_from_the_answer(tmp_path, backend):
    thinking = HFBackend(backend.model_dir, device="cpu", model=backend.model, tokenizer=backend.tokenizer,
                         reasoning_end="=")
    comps = thinking.generate(PROMPTS, 8, thinking_budget=3)
    plain = backend.generate(PROMPTS, 8)
    # The reasoning is what came before the end marker (which the budget forced after 3 tokens).
    assert any(c.reasoning for c in comps) and all("=" not in c.reasoning for c in comps)
    assert [c.text for c in comps] != [c.text for c in plain]
    assert thinking.identity() != backend.identity()


def test_sampling_is_refused(backend):
    with pytest.raises(MoePruneError, match="generates greedily"):
        backend.generate(PROMPTS[:1], 2, sampler={"temperature": 0.7})


def test_chat_needs_a_chat_template(backend):
    with pytest.raises(MoePruneError, match="no chat template"):
        backend.generate(PROMPTS[:1], 2, chat=True)
