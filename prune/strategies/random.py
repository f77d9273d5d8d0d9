"""random: seeded uniform scores, the floor any recipe must beat. The same seed gives the same map."""

from dataclasses import dataclass

import numpy as np

from moeprune import schema
from moeprune.prune.strategies.base import PooledCriterion, StrategyConfig


@schema.schema("strategy", "random")
@dataclass
class RandomStrategyConfig(StrategyConfig):
    seed: int = 0  # another seed, another draw


class RandomStrategy(PooledCriterion):
    Schema = RandomStrategyConfig
    needs = ("count",)

    def __init__(self, cfg: RandomStrategyConfig | None = None, **knobs):
        super().__init__(cfg, **knobs)
        self.seed = self.cfg.seed

    def per_class(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        C, L, E = stats["count"].shape
        return np.broadcast_to(np.random.default_rng(self.seed).random((L, E)), (C, L, E))

    def pooled(self, stats: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
        return self.per_class(stats)[0]
