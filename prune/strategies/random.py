"""random: seeded uniform scores, the floor any recipe must beat. The same seed gives the same map."""

import numpy as np

from moeprune.prune.strategies.base import PooledCriterion


class RandomStrategy(PooledCriterion):
    needs = ("count",)

    def __init__(self, name: str, normalize: str = "rank", protect_top: int = 0, protect_class_top: int = 0,
                 rank_ties: str = "min", seed: int = 0):
        super().__init__(name, normalize, protect_top, protect_class_top, rank_ties)
        self.seed = seed

    def per_class(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        C, L, E = stats["count"].shape
        return np.broadcast_to(np.random.default_rng(self.seed).random((L, E)), (C, L, E))

    def pooled(self, stats: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
        return self.per_class(stats)[0]
