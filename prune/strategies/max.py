"""max: an expert is worth its strongest weighted class — kept if ANY class relies on it
(v4, v5/v6/v7-coder). agg = max_c w_c * s_c."""

import numpy as np

from moeprune.prune.strategies.base import ClassAggregate


class MaxStrategy(ClassAggregate):
    def combine(self, s: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (w[:, None, None] * s).max(axis=0)
