"""toy_suite: the toy world's held-out split for every class, exact match (code answers come from
executing the programs when the tasks are generated)."""

from __future__ import annotations

from moeprune.evaluate.types import Sample
from moeprune.toy import world


class ToySuite:
    def __init__(self, name: str = "toy_suite", n_per_class: int = 100, split: str = "test", seed: int = 0,
                 classes: list[str] | None = None):
        self.name, self.n_per_class, self.split, self.seed = name, n_per_class, split, seed
        self.classes = list(classes or world.CLASSES)
        self.max_new_tokens = world.MAX_NEW_TOKENS
        self._tasks = {}

    def samples(self) -> list[Sample]:
        out = []
        for c in self.classes:
            for i, t in enumerate(world.make_tasks(c, self.n_per_class, self.split, self.seed)):
                sid = f"{c}/{i}"
                self._tasks[sid] = t
                out.append(Sample(sid, t.prompt, t.answer, category=c))
        return out

    def score(self, sample: Sample, completion: str) -> bool:
        return world.is_correct(self._tasks[sample.id], completion)
