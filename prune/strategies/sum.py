"""sum: agg = sum_c w_c * s_c. With normalize=none and uniform weights this is the pooled v3 score
(sum over every calibration pass of alpha * wnorm + count)."""

import numpy as np

from moeprune.prune.strategies.base import ClassAggregate


class SumStrategy(ClassAggregate):
    def combine(self, s: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.tensordot(w, s, axes=1)
