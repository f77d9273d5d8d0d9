"""The multi-class scoring pipeline shared by the aggregating strategies (see docs/recipes.md).

per-class score  s[c,l,e] = alpha * wnorm + count   (score=legacy)  or  alpha * wnorm  (score=mean)
normalize        per (class, layer): rank -> percentile in [0, 1]; mean -> divide by the row mean
aggregate        weighted over classes into agg[l,e] (max / mean / geomean / sum: one file each)
breadth bonus    agg += breadth_bonus * mean over classes of the normalized scores
"""

from __future__ import annotations

import numpy as np

from moeprune.errors import MoePruneError


def rank_normalize(s: np.ndarray) -> np.ndarray:
    """Percentile rank along the last axis: stable argsort, rank / (E - 1)."""
    ranks = np.argsort(np.argsort(s, axis=-1, kind="stable"), axis=-1, kind="stable")
    return ranks.astype(np.float64) / max(s.shape[-1] - 1, 1)


def mean_normalize(s: np.ndarray) -> np.ndarray:
    return s / np.clip(s.mean(axis=-1, keepdims=True), 1e-12, None)


NORMALIZERS = {"rank": rank_normalize, "mean": mean_normalize, "none": lambda s: s}


class Strategy:
    """Turns a profile into keep scores agg[l, e]: higher = more worth keeping."""

    def __init__(self, name: str, normalize: str = "rank", alpha: float = 2.0, score: str = "legacy",
                 breadth_bonus: float = 0.0, protect_top: int = 0, seed: int = 0):
        if normalize not in NORMALIZERS:
            raise MoePruneError(f"strategy.normalize={normalize!r}: expected one of {', '.join(NORMALIZERS)}")
        if score not in ("legacy", "mean"):
            raise MoePruneError(f"strategy.score={score!r}: expected legacy or mean")
        if protect_top < 0:
            raise MoePruneError(f"strategy.protect_top={protect_top}: expected >= 0")
        self.name, self.normalize, self.alpha, self.score = name, normalize, alpha, score
        self.breadth_bonus, self.protect_top, self.seed = breadth_bonus, protect_top, seed

    def class_scores(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        s = self.alpha * stats["wnorm"]
        return s + stats["count"] if self.score == "legacy" else s

    def aggregate(self, s: np.ndarray, w: np.ndarray) -> np.ndarray:  # s [C,L,E], w [C] -> [L,E]
        raise NotImplementedError

    def keep_scores(self, stats: dict[str, np.ndarray], weights: np.ndarray) -> np.ndarray:
        s = NORMALIZERS[self.normalize](self.class_scores(stats).astype(np.float64))
        agg = self.aggregate(s, weights)
        if self.breadth_bonus:
            agg = agg + self.breadth_bonus * s.mean(axis=0)
        return agg
