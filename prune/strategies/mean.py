"""mean: the class-weighted average, agg = sum_c w_c * s_c / sum_c w_c. Favours generalists: an
expert that one class depends on but others ignore scores low."""

import numpy as np

from moeprune.prune.strategies.base import ClassAggregate


class MeanStrategy(ClassAggregate):
    def combine(self, s: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.tensordot(w, s, axes=1) / w.sum()
