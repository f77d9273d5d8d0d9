"""gate_mass: the sum of the router's gate weights the expert received, over the weighted classes."""

import numpy as np

from moeprune.prune.strategies.base import PooledCriterion


class GateMassStrategy(PooledCriterion):
    needs = ("gate_sum",)

    def per_class(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        return stats["gate_sum"]
