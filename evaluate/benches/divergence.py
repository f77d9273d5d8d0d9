"""divergence: how far a pruned model's next-token distributions move from the base model's, on
held-out prompts of each class, teacher-forced on the base model's own greedy continuation. One
forward pass per trial and no generation: the recipe search's objective on the real model
(docs/evaluation.md, "The objective without generation"; evaluate/teacher_forced.py computes it).

The prompts: `bench.texts: toy` takes the toy world's tasks of `bench.split` (val or test, never the
calib split the profile reads); `bench.texts: DIR` reads `DIR/<class>.jsonl` (one object per line,
`text`: a user prompt, or `messages`: a chat), split into val and test by a hash of each prompt.
Prompts that also occur in the run's calibration corpus are left out (the reference stage counts
them), so the objective never scores a text the profile ranked experts on.

`bench.metric` picks what `score` and `per_category` hold: `kl` (mean KL(base || pruned) over the
continuation tokens), `nll` (the mean negative log-likelihood of the base's tokens) or `agreement`
(the share of positions whose pruned argmax is the base's token). kl and nll are better lower:
studies minimize them. The summary carries all three.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from moeprune import artifacts, schema
from moeprune.errors import MoePruneError
from moeprune.evaluate.benches.base import Bench, BenchConfig
from moeprune.evaluate.types import Sample
from moeprune.schema import Choice
from moeprune.toy import world

TOY = "toy"


class DivergenceMetric(Choice):
    kl = "kl"  # mean KL(base || pruned) over the continuation tokens (lower is better)
    nll = "nll"  # mean negative log-likelihood of the base's tokens (lower is better)
    agreement = "agreement"  # share of positions whose argmax is the base's token (higher is better)


METRICS = tuple(m.value for m in DivergenceMetric)  # the schema's choices, written once


@schema.schema("bench", "divergence")
@dataclass
class DivergenceBenchConfig(BenchConfig):
    """divergence: the teacher-forced objective (this module)."""

    texts: str = TOY  # toy (the toy world's tasks) or a dir of held-out <class>.jsonl prompts
    metric: DivergenceMetric = DivergenceMetric.kl  # what score and per_category hold
    # base distribution entries kept per position (the KL is exact when >= vocab)
    top_logprobs: int = schema.knob(256, lambda v: v >= 1, ">= 1 (the base distribution's entries kept per position)")
    n_per_class: int = schema.knob(100, lambda v: v >= 1, "at least 1 problem per class")
    classes: Optional[List[str]] = None  # null = every class (toy) / every file in texts


class Divergence(Bench):
    default_name = "divergence"
    default_max_new_tokens = 128  # the continuation teacher-forced after each prompt (the reference profile's)
    Schema = DivergenceBenchConfig
    teacher_forced = True  # scored by evaluate/teacher_forced.py against the reference stage, not generated

    def __init__(self, cfg: DivergenceBenchConfig | None = None, **knobs):
        cfg = schema.make(DivergenceBenchConfig, cfg, knobs, "bench")
        self.texts = str(cfg.texts)  # check_split reads it, inside Bench's constructor
        super().__init__(cfg)
        metric = DivergenceMetric.parse(cfg.metric, f"bench {self.name}: bench.metric", f"one of {METRICS}")
        if self.texts != TOY and not Path(self.texts).expanduser().is_dir():
            raise MoePruneError(f"bench {self.name}: bench.texts={self.texts}: not a directory; expected `toy` or a "
                                "dir holding <class>.jsonl of held-out prompts for each class")
        if self.thinking_budget is not None or self.sampler.get("temperature", 0) != 0:
            raise MoePruneError(f"bench {self.name}: the base continuation is greedy and unbudgeted: expected "
                                "bench.thinking_budget=null and bench.sampler.temperature=0 (bench.max_new_tokens "
                                "bounds the continuation)")
        self.metric, self.top_logprobs = str(metric), cfg.top_logprobs
        self.classes = list(cfg.classes or (world.CLASSES if self.texts == TOY else self._files()))
        if not self.classes:
            raise MoePruneError(f"bench {self.name}: bench.texts={self.texts} holds no <class>.jsonl file")

    def check_split(self) -> None:
        allowed = ("val", "test") if self.texts == TOY else ("all", "val", "test")
        if self.split not in allowed:
            why = " (calib is the profile's)" if self.texts == TOY else ""
            raise MoePruneError(f"bench {self.name}: bench.split={self.split}: expected one of {allowed}{why}")

    def _files(self) -> list[str]:
        return sorted(p.stem for p in Path(self.texts).expanduser().glob("*.jsonl"))

    def rows(self) -> list[dict]:
        if self.texts == TOY:
            rows = [{"cls": c, "id": f"{c}/{i}", "prompt": t.prompt}
                    for c in self.classes for i, t in enumerate(world.make_tasks(c, self.n_per_class, self.split))]
        else:
            rows = [r for c in self.classes for r in self._read(c)]
        self.data_hash = artifacts.hash_json(rows)
        return rows

    def _read(self, cls: str) -> list[dict]:
        path = Path(self.texts).expanduser() / f"{cls}.jsonl"
        if not path.is_file():
            raise MoePruneError(f"bench {self.name}: {path} not found: expected a held-out prompt file for class {cls}")
        rows = []
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise MoePruneError(f"{path}:{n}: not JSON ({e}): expected one object per line") from None
                prompt = obj.get("messages", obj.get("text")) if isinstance(obj, dict) else None
                if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
                    raise MoePruneError(f"{path}:{n}: expected an object with `text` (a string) or `messages` (a chat)")
                key = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]
                rows.append({"cls": cls, "id": f"{cls}/{key}", "prompt": prompt})
        return rows  # in_split takes each class's first n_per_class of the split

    def build(self, rows: list[dict]) -> list[Sample]:
        return [Sample(r["id"], r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]), "",
                       category=r["cls"], extra={"messages": self.render(prompt=r["prompt"])
                                                 if isinstance(r["prompt"], str) else r["prompt"]}) for r in rows]

    def in_split(self, samples: list[Sample]) -> list[Sample]:
        if self.texts == TOY:
            return samples  # rows() drew the toy split's tasks
        kept = super().in_split(samples)
        per_class: dict[str, list[Sample]] = {}
        for s in kept:
            per_class.setdefault(s.category, []).append(s)
        return [s for c in self.classes for s in per_class.get(c, [])[: self.n_per_class]]

    def encode(self, tokenizer, sample: Sample, enable_thinking: bool) -> list[int]:
        """The prompt's token ids as the model reads it: through the chat template (bench.chat) or raw."""
        prompt = sample.extra["messages"]
        if not self.chat:
            if not isinstance(prompt, str):
                raise MoePruneError(f"bench {self.name}: {sample.id} is a chat (messages): expected bench.chat=true")
            return tokenizer(prompt)["input_ids"]
        if not getattr(tokenizer, "chat_template", None):
            raise MoePruneError(f"bench {self.name}: the tokenizer has no chat template: expected bench.chat=false")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=enable_thinking)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def settings(self) -> dict:
        return {**super().settings(), "texts": self.texts, "metric": self.metric, "top_logprobs": self.top_logprobs,
                "classes": self.classes}
