"""toy_suite: the toy world's held-out split for every class, exact match (code answers come from
executing the programs when the tasks are generated)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from moeprune import artifacts, schema
from moeprune.errors import MoePruneError
from moeprune.evaluate.benches.base import Bench, BenchConfig
from moeprune.evaluate.types import Sample, Verdict
from moeprune.toy import world


@schema.schema("bench", "toy_suite")
@dataclass
class ToySuiteBenchConfig(BenchConfig):
    chat: bool = False  # the toy model has no chat template: raw prompts
    n_per_class: int = schema.knob(100, lambda v: v >= 1, "at least 1 problem per class")
    seed: int = 0
    classes: Optional[List[str]] = None  # null = every class


class ToySuite(Bench):
    default_name = "toy_suite"
    default_split = "test"
    default_max_new_tokens = world.MAX_NEW_TOKENS  # toy answers are short
    Schema = ToySuiteBenchConfig

    def __init__(self, cfg: ToySuiteBenchConfig | None = None, **knobs):
        super().__init__(cfg, **knobs)
        self.classes = self.cfg.classes
        unknown = sorted(set(self.classes or ()) - set(world.CLASSES))
        if unknown:
            raise MoePruneError(f"bench {self.name}: unknown classes {unknown}; expected some of {list(world.CLASSES)}")
        self.classes = list(self.classes or world.CLASSES)
        self._tasks: dict[str, world.Task] = {}

    def check_split(self) -> None:
        if self.split not in world.SPLITS:  # the toy world's own splits, disjoint by construction
            raise MoePruneError(f"bench {self.name}: bench.split={self.split}: expected one of {world.SPLITS}")

    def in_split(self, samples: list[Sample]) -> list[Sample]:
        return samples  # rows() already drew the split's tasks

    def rows(self) -> list[dict]:
        rows = [{"cls": c, "i": i, "prompt": t.prompt, "answer": t.answer}
                for c in self.classes for i, t in enumerate(world.make_tasks(c, self.n_per_class, self.split, self.seed))]
        self.data_hash = artifacts.hash_json(rows)
        return rows

    def build(self, rows: list[dict]) -> list[Sample]:
        out = []
        for r in rows:
            sid = f"{r['cls']}/{r['i']}"
            self._tasks[sid] = world.Task(r["cls"], r["prompt"], r["answer"])
            out.append(Sample(sid, self.render(prompt=r["prompt"]), r["answer"], category=r["cls"]))
        return out

    def score(self, sample: Sample, completion: str) -> Verdict:
        return Verdict(world.is_correct(self._tasks[sample.id], completion), completion.strip())

    def canonical(self, sample: Sample) -> str:
        return sample.reference
