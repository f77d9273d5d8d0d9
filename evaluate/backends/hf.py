"""Local transformers backend: batched greedy generation with a KV cache (left padding).

With a drop map it routes as the pruned model would (virtual pruning), and with shared_ffn_alpha it
scales the shared FFN as surgery would (restored after each generate), so a sweep trial can score
a recipe on the loaded base model without writing a checkpoint.

Thinking models: `reasoning_start` / `reasoning_end` (the model family's markers, e.g. `<think>` /
`</think>`) split each completion into reasoning and answer; the scorer reads the answer. A bench's
thinking budget is enforced as llama-server does: a completion still thinking after that many
tokens is made to close its thinking (the end marker is forced) and goes on to answer.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.evaluate.backends.base import Backend
from moeprune.evaluate.reasoning import split_reasoning
from moeprune.evaluate.types import Completion
from moeprune.models import load_model, load_tokenizer, read_config

log = logging.getLogger("moeprune")


class ThinkingBudget(LogitsProcessor):
    """Force the end-of-thinking marker into rows that have not closed their thinking in `budget`
    generated tokens. A row counts as closed once it emits the marker's last token."""

    def __init__(self, prompt_len: int, budget: int, end_ids: list[int]):
        self.prompt_len, self.budget, self.end_ids = prompt_len, budget, end_ids
        self.closed: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        if self.closed is None:
            self.closed = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if n > 0:
            self.closed |= input_ids[:, -1] == self.end_ids[-1]
        k = n - self.budget
        if 0 <= k < len(self.end_ids):
            force = ~self.closed
            scores[force] = float("-inf")
            scores[force, self.end_ids[k]] = 0.0
        return scores


class HFBackend(Backend):
    runtime = ("model_dir", "dtype", "device", "drop_map", "shared_ffn_alpha", "model")

    def __init__(self, model_dir: Path, dtype: str = "float32", device: str = "auto", batch_size: int = 128,
                 drop_map=None, shared_ffn_alpha: float = 1.0, model=None, tokenizer=None,
                 reasoning_start: str | None = None, reasoning_end: str | None = None, enable_thinking: bool = False,
                 name: str = "hf", max_new_tokens: int | None = None):
        self.name, self.max_new_tokens = name, max_new_tokens  # every backend's knobs; the stage reads the limit
        if batch_size <= 0:
            raise MoePruneError(f"backend.batch_size={batch_size}: expected a positive number of prompts per batch")
        self.model_dir = Path(model_dir)
        self.model = model if model is not None else load_model(self.model_dir, dtype, device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.batch_size = self.chunk_size = batch_size
        self.drop_map = drop_map  # virtual pruning: a DropMap (moeprune.prune.drop_map), or None
        self.shared_ffn_alpha = shared_ffn_alpha  # virtual pruning's prune.shared_ffn_alpha
        self.markers = (reasoning_start, reasoning_end) if reasoning_end else None
        self.enable_thinking = enable_thinking
        self.dtype = dtype

    def identity(self) -> dict:
        """What makes this backend's generations what they are (the generation cache key)."""
        ident = {"backend": "hf", "model": artifacts.hash_path(self.model_dir), "dtype": self.dtype,
                 "drop_map": artifacts.hash_json(sorted(self.drop_map.items())) if self.drop_map else None,
                 "reasoning": self.markers, "enable_thinking": self.enable_thinking}
        if self.shared_ffn_alpha != 1.0:  # only then, so keys cached before the knob existed still hit
            ident["shared_ffn_alpha"] = self.shared_ffn_alpha
        return ident

    def close(self) -> None:
        self.model = self.tokenizer = None  # the weights go with the last reference (a run may hold two models)

    @contextlib.contextmanager
    def _routing(self):
        if not self.drop_map and self.shared_ffn_alpha == 1.0:
            yield
            return
        from moeprune.adapters import adapter_for

        adapter = adapter_for(read_config(self.model_dir))
        with adapter.upweight_shared_ffn(self.model, self.shared_ffn_alpha, self._stored_dtypes()), \
                (adapter.virtual_prune(self.model, self.drop_map) if self.drop_map else contextlib.nullcontext()):
            yield

    def _stored_dtypes(self) -> dict[str, torch.dtype]:
        """The checkpoint's dtype of each tensor: surgery rounds a scaled tensor to it, so the
        in-memory upweight must too (a float32 load of a bfloat16 checkpoint would not)."""
        if self.shared_ffn_alpha == 1.0:
            return {}
        from moeprune.prune.surgery import read_sources

        codes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        return {t.name: codes[t.dtype] for t in read_sources(self.model_dir).values() if t.dtype in codes}

    def _texts(self, prompts: list[str], chat: bool) -> list[str]:
        if not chat:
            return prompts
        if not getattr(self.tokenizer, "chat_template", None):
            raise MoePruneError(f"{self.model_dir}: the tokenizer has no chat template; this bench needs one "
                                f"(or set bench.chat=false to send raw prompts)")
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=self.enable_thinking)
                for p in prompts]

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, *, chat: bool = False,
                 thinking_budget: int | None = None, sampler: dict | None = None) -> list[Completion]:
        if sampler and (sampler.get("temperature", 0) != 0):
            raise MoePruneError(f"backend hf generates greedily; bench.sampler={sampler}: expected temperature 0")
        tok = self.tokenizer
        texts = self._texts(prompts, chat)
        # Sorting by length keeps padding (and wasted compute) per batch small.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: dict[int, Completion] = {}
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        with self._routing():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                # A chat template already writes <bos>; raw prompts get the tokenizer's own specials.
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=not chat).to(self.model.device)
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id,
                                          logits_processor=self._budget(enc["input_ids"].shape[1], thinking_budget))
                new = gen[:, enc["input_ids"].shape[1]:]
                for row, i in zip(new.tolist(), idx):
                    n = next((k for k, t in enumerate(row) if t in eos_ids), None)
                    body = row if n is None else row[:n]
                    results[i] = self._completion(body, "length" if n is None else "stop")
        return [results[i] for i in range(len(prompts))]

    def _budget(self, prompt_len: int, thinking_budget: int | None) -> LogitsProcessorList:
        if not thinking_budget:
            return LogitsProcessorList()
        if not self.markers:  # nothing says where thinking ends: a model that does not think
            log.warning("bench.thinking_budget=%s is not enforced: backend.reasoning_end is not set", thinking_budget)
            return LogitsProcessorList()
        end_ids = self.tokenizer.encode(self.markers[1], add_special_tokens=False)
        return LogitsProcessorList([ThinkingBudget(prompt_len, thinking_budget, end_ids)])

    def _completion(self, ids: list[int], finish: str) -> Completion:
        if not self.markers:
            return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids), finish)
        raw = self.tokenizer.decode(ids, skip_special_tokens=False)
        reasoning, answer = split_reasoning(raw, *self.markers)
        for special in self.tokenizer.all_special_tokens:
            answer = answer.replace(special, "")
        return Completion(answer.strip(), len(ids), finish, reasoning=reasoning)
