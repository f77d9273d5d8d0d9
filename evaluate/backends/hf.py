"""Local transformers backend: batched greedy generation with a KV cache (left padding).

With a VirtualPrune (moeprune.dropmap) it routes around the map's dropped experts as the pruned
model would, and scales the shared FFN by its alpha as surgery would (restored after each
generate), so a sweep trial can score a recipe on the loaded base model without writing a checkpoint.

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

from moeprune import artifacts, schema
from moeprune.checkpoint import stored_dtypes
from moeprune.dropmap import VirtualPrune
from moeprune.errors import MoePruneError
from moeprune.evaluate.backends.base import Backend, HFBackendConfig
from moeprune.evaluate.reasoning import split_reasoning
from moeprune.evaluate.types import Completion
from moeprune.models import load_model, load_tokenizer, read_config

log = logging.getLogger("moeprune")
TEACHER_LOGITS = 2**28  # next-token log-probs held at once when teacher-forcing (1 GiB in float32)


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
    runtime = ("model_dir", "dtype", "device", "virtual", "model")

    def __init__(self, model_dir: Path, cfg: HFBackendConfig | None = None, dtype: str = "float32", device: str = "auto",
                 virtual: VirtualPrune | None = None, model=None, tokenizer=None, **knobs):
        cfg = schema.make(HFBackendConfig, cfg, knobs, "backend")
        self.name, self.max_new_tokens = cfg.name, cfg.max_new_tokens  # every backend's knobs; the stage reads the limit
        batch_size, reasoning_start, reasoning_end = cfg.batch_size, cfg.reasoning_start, cfg.reasoning_end
        enable_thinking = cfg.enable_thinking
        self.model_dir = Path(model_dir)
        self.model = model if model is not None else load_model(self.model_dir, dtype, device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.batch_size = self.chunk_size = batch_size
        self.virtual = virtual or VirtualPrune()  # the default prunes nothing
        self.markers = (reasoning_start, reasoning_end) if reasoning_end else None
        self.enable_thinking = enable_thinking
        self.dtype = dtype

    def identity(self) -> dict:
        """What makes this backend's generations what they are (the generation cache key)."""
        drop_map = self.virtual.drop_map
        ident = {"backend": "hf", "model": artifacts.hash_path(self.model_dir), "dtype": self.dtype,
                 "drop_map": artifacts.hash_json(sorted(drop_map.items())) if drop_map else None,
                 "reasoning": self.markers, "enable_thinking": self.enable_thinking}
        if self.virtual.shared_ffn_alpha != 1.0:  # only then, so keys cached before the knob existed still hit
            ident["shared_ffn_alpha"] = self.virtual.shared_ffn_alpha
        return ident

    def close(self) -> None:
        self.model = self.tokenizer = None  # the weights go with the last reference (a run may hold two models)

    @contextlib.contextmanager
    def _routing(self):
        drop_map, alpha = self.virtual.drop_map, self.virtual.shared_ffn_alpha
        if not drop_map and alpha == 1.0:
            yield
            return
        from moeprune.adapters import adapter_for

        adapter = adapter_for(read_config(self.model_dir))
        with adapter.upweight_shared_ffn(self.model, alpha, self._stored_dtypes()), \
                (adapter.virtual_prune(self.model, drop_map) if drop_map else contextlib.nullcontext()):
            yield

    def _stored_dtypes(self) -> dict[str, torch.dtype]:
        """The checkpoint's dtype of each tensor: surgery rounds a scaled tensor to it, so the
        in-memory upweight must too (a float32 load of a bfloat16 checkpoint would not)."""
        return stored_dtypes(self.model_dir) if self.virtual.shared_ffn_alpha != 1.0 else {}

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
        texts = self._texts(prompts, chat)
        # A chat template already writes <bos>; raw prompts get the tokenizer's own specials.
        ids = [self.tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
        with self._routing():
            rows = self._greedy(ids, max_new_tokens, thinking_budget)
        eos_ids = self._eos_ids()
        out = []
        for row in rows:
            n = next((k for k, t in enumerate(row) if t in eos_ids), None)
            out.append(self._completion(row if n is None else row[:n], "length" if n is None else "stop"))
        return out

    @torch.no_grad()
    def greedy_ids(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Each tokenized prompt's greedy continuation as token ids, up to and including its first EOS
        (virtual pruning applied): the base side of the teacher-forced objective."""
        eos_ids = self._eos_ids()
        with self._routing():
            rows = self._greedy(prompts, max_new_tokens, None)
        return [row[:next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))] for row in rows]

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    def _greedy(self, prompts: list[list[int]], max_new_tokens: int, thinking_budget: int | None) -> list[list[int]]:
        """The generated ids of each prompt (max_new_tokens of them; past an EOS they are padding)."""
        # Sorting by length keeps padding (and wasted compute) per batch small.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        pad = self.tokenizer.pad_token_id
        results: dict[int, list[int]] = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self._left_padded([prompts[i] for i in idx])
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                      logits_processor=self._budget(enc["input_ids"].shape[1], thinking_budget))
            for row, i in zip(gen[:, enc["input_ids"].shape[1]:].tolist(), idx):
                results[i] = row
        return [results[i] for i in range(len(prompts))]

    def _left_padded(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return {"input_ids": ids.to(self.model.device), "attention_mask": mask.to(self.model.device)}

    @torch.no_grad()
    def teacher_forced(self, prompts: list[list[int]], continuations: list[list[int]], reduce) -> list:
        """Teacher-force each prompt + continuation (virtual pruning applied) and hand each batch's
        next-token log-probabilities at the continuation's positions to `reduce(rows, logprobs
        [B, L, V] float32, mask [B, L], targets [B, L])`, which returns one small result per row.
        Only a batch's continuation logits are ever held: at a 262,144-token vocabulary the batch
        is cut so that they stay under TEACHER_LOGITS elements."""
        # Sorted by whole length, so each batch pads little (the logits kept follow its longest continuation).
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(continuations[i]))
        vocab = self.model.get_output_embeddings().weight.shape[0]
        out: dict[int, object] = {}
        with self._routing():
            start = 0
            while start < len(order):
                window = order[start:start + self.batch_size]
                longest = max(len(continuations[i]) for i in window)
                rows = max(1, min(self.batch_size, TEACHER_LOGITS // max(1, longest * vocab)))
                idx = order[start:start + rows]
                start += rows
                width = max(len(continuations[i]) for i in idx)
                enc = self._left_padded([prompts[i] + continuations[i] for i in idx])
                # Left padding: positions count from each row's first real token, as in generate.
                position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = self.model(**enc, position_ids=position_ids, logits_to_keep=width + 1).logits[:, :-1]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                del logits
                targets = enc["input_ids"][:, -width:]
                lengths = torch.tensor([len(continuations[i]) for i in idx], device=targets.device)
                mask = torch.arange(width, device=targets.device)[None, :] >= (width - lengths)[:, None]
                for i, result in zip(idx, reduce(idx, logprobs, mask, targets)):
                    out[i] = result
        return [out[i] for i in range(len(prompts))]

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
