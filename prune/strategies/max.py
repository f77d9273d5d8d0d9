"""max: keep an expert if any (weighted) class relies on it strongly — the v4 / coder recipes."""

import numpy as np

from moeprune.prune.strategies.base import Strategy


class MaxStrategy(Strategy):
    def aggregate(self, s: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (w[:, None, None] * s).max(axis=0)
