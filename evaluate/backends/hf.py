"""Local transformers backend: batched greedy generation with a KV cache (left padding).

With a drop map it routes as the pruned model would (virtual pruning), so a sweep trial can score
a recipe on the loaded base model without writing a checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from moeprune.evaluate.types import Completion
from moeprune.models import load_model, load_tokenizer, read_config


class HFBackend:
    def __init__(self, model_dir: Path, dtype: str = "float32", device: str = "auto", batch_size: int = 128,
                 drop_map: dict[int, list[int]] | None = None, model=None, tokenizer=None):
        self.model_dir = Path(model_dir)
        self.model = model if model is not None else load_model(self.model_dir, dtype, device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.batch_size = batch_size
        self.drop_map = drop_map or {}

    def _routing(self):
        if not self.drop_map:
            return contextlib.nullcontext()
        from moeprune.adapters import adapter_for

        return adapter_for(read_config(self.model_dir)).virtual_prune(self.model, self.drop_map)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[Completion]:
        tok, out = self.tokenizer, []
        # Sorting by length keeps padding (and wasted compute) per batch small.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: dict[int, Completion] = {}
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        with self._routing():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(self.model.device)
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                for row, i in zip(new.tolist(), idx):
                    n = next((k for k, t in enumerate(row) if t in eos_ids), None)
                    body = row if n is None else row[:n]
                    results[i] = Completion(tok.decode(body, skip_special_tokens=True), len(body),
                                            "length" if n is None else "stop")
        out = [results[i] for i in range(len(prompts))]
        return out
