"""random: seeded uniform scores, the floor any recipe must beat. The same seed gives the same map."""

import numpy as np

from moeprune.prune.strategies.base import PooledCriterion


class RandomStrategy(PooledCriterion):
    needs = ("count",)

    def __init__(self, name: str, seed: int = 0, **knobs):
        super().__init__(name, **knobs)
        self.seed = seed

    def per_class(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        C, L, E = stats["count"].shape
        return np.broadcast_to(np.random.default_rng(self.seed).random((L, E)), (C, L, E))

    def pooled(self, stats: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
        return self.per_class(stats)[0]
