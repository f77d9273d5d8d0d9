"""frequency: how many tokens the router sent to the expert, summed over the weighted classes."""

import numpy as np

from moeprune.prune.strategies.base import PooledCriterion


class FrequencyStrategy(PooledCriterion):
    needs = ("count",)

    def per_class(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        return stats["count"]
