"""toy_suite: the toy world's held-out split for every class, exact match (code answers come from
executing the programs when the tasks are generated)."""

from __future__ import annotations

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.evaluate.benches.base import Bench
from moeprune.evaluate.types import Sample, Verdict
from moeprune.toy import world


class ToySuite(Bench):
    default_name = "toy_suite"
    default_split = "test"
    default_max_new_tokens = world.MAX_NEW_TOKENS  # toy answers are short
    reads = ("n_per_class", "seed", "classes")

    def __init__(self, name: str | None = None, **kw):
        kw.setdefault("chat", False)
        super().__init__(name, **kw)
        unknown = sorted(set(self.classes or ()) - set(world.CLASSES))
        if unknown:
            raise MoePruneError(f"bench {name}: unknown classes {unknown}; expected some of {list(world.CLASSES)}")
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
