"""reap: the mean over routed tokens of gate weight x ||expert output|| (router-weighted expert
activation). Pooled as a ratio of weighted sums, sum_c w_c*contrib_c / sum_c w_c*count_c, so it is
the mean over the weighted tokens, not a mean of class means; an expert never routed scores 0."""

import numpy as np

from moeprune.prune.strategies.base import PooledCriterion


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


class ReapStrategy(PooledCriterion):
    needs = ("contrib_sum", "count")

    def per_class(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        return _ratio(stats["contrib_sum"], stats["count"])

    def pooled(self, stats: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
        return _ratio(np.tensordot(w, stats["contrib_sum"], axes=1), np.tensordot(w, stats["count"], axes=1))
