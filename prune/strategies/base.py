"""What every drop-map strategy shares: knob validation, outlier treatment, normalization.

A strategy turns profile statistics ([classes, layers, experts] arrays) and a class-weight vector
into `Scores`: one keep score per (layer, expert) — higher means more worth keeping — plus one
score per class that the class top-K protection ranks by. Two families (docs/recipes.md):

- `ClassAggregate` (max, mean, geomean, sum): the reference recipe. Per class a base statistic
  (`score`): s = alpha * wnorm + count ("legacy"), alpha * wnorm ("mean"), or a baseline's own
  statistic ("reap", "frequency", "gate_mass", below); outliers treated per (class, layer) row; normalized per (class, layer) row; combined over classes with the class weights;
  plus breadth_bonus * the unweighted class mean of the normalized scores.
- `PooledCriterion` (frequency, gate_mass, reap, random): one statistic pooled over the weighted
  classes, the single-criterion baselines a recipe is compared against.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from omegaconf import MISSING

from moeprune import schema
from moeprune.errors import MoePruneError
from moeprune.schema import Choice


class Normalize(Choice):
    rank = "rank"
    mean = "mean"
    none = "none"


class RankTies(Choice):
    stable = "stable"  # the reference's: equal scores ranked and sorted by expert id
    min = "min"  # equal scores share the lowest rank; the baseline map breaks them


class Score(Choice):
    legacy = "legacy"  # alpha * wnorm + routed count
    mean = "mean"  # alpha * wnorm
    reap = "reap"  # the class's share of REAP's token mean: contrib_c / pooled routed count
    frequency = "frequency"  # routed count
    gate_mass = "gate_mass"  # summed gate weight


class OutlierMode(Choice):
    keep = "keep"
    median = "median"
    drop = "drop"
    zero = "zero"


@schema.schema("strategy", "pooled")
@dataclass
class StrategyConfig:
    """Every strategy: the pooled single-criterion baselines (frequency, gate_mass, reap) take these.
    A floor under one ranks by the reference score at ClassAggregateConfig's defaults."""

    _target_: str = MISSING
    name: str = MISSING
    normalize: Normalize = Normalize.rank  # per (class, layer) for class aggregates, per layer when pooled
    protect_top: int = schema.knob(0, lambda v: v >= 0, "an integer >= 0")  # never drop a layer's top-k experts by agg
    # never drop any weighted class's top-k experts of a layer
    protect_class_top: int = schema.knob(0, lambda v: v >= 0, "an integer >= 0")
    rank_ties: RankTies = RankTies.min


@schema.schema("strategy", "class_aggregate")
@dataclass
class ClassAggregateConfig(StrategyConfig):
    """max, mean, geomean, sum: per-class scores combined over classes."""

    # multiplier of the contribution term: score = alpha * wnorm + tc
    alpha: float = schema.knob(2.0, lambda v: v >= 0, "a finite number >= 0")
    score: Score = Score.legacy  # the per-class base statistic; alpha applies to legacy and mean only
    # agg += breadth_bonus * mean over classes of the normalized scores
    breadth_bonus: float = schema.knob(0.0, lambda v: v >= 0, "a finite number >= 0")
    outlier_mode: OutlierMode = OutlierMode.median  # what replaces an outlier cell
    # |wnorm| above this is an outlier (non-finite always is)
    outlier_threshold: Optional[float] = schema.knob(None, lambda v: v > 0, "null or a number > 0")

#: The per-class base statistics of the class-weighted recipe, and the profile statistics each reads.
#: The baselines' statistics are chosen so that `sum` with normalize=none reproduces the pooled
#: baseline exactly (same weights): frequency sum_c w_c count_c, gate_mass sum_c w_c gate_sum_c,
#: and reap's class share contrib_c / (sum_c' w_c' count_c'), whose weighted sum is REAP's
#: token mean sum_c w_c contrib_c / sum_c w_c count_c. So REAP, frequency and gate mass are
#: points of the recipe space, and a search over it can only beat them.
BASE_SCORES = {Score.legacy: ("wnorm", "count"), Score.mean: ("wnorm",), Score.reap: ("contrib_sum", "count"),
               Score.frequency: ("count",), Score.gate_mass: ("gate_sum",)}
_WNORM_SCORES = ("legacy", "mean")  # the scores alpha multiplies


def rank_normalize(s: np.ndarray, ties: str = "min") -> np.ndarray:
    """Percentile rank along the last axis in [0, 1]: rank / (E - 1). Invariant to any strictly
    increasing rescaling.

    ties="min": equal values share the lowest rank, (number of strictly smaller cells) / (E - 1).
    ties="stable" (the reference's): the position in a stable ascending sort, so tied cells —
    typically the many experts a class never routes to, all at 0 — get ranks that grow with their
    id (an arbitrary bonus for high ids, which the published maps carry).
    """
    rows = s.reshape(-1, s.shape[-1])
    ranks = np.empty(rows.shape, dtype=np.float64)
    for i, r in enumerate(rows):
        if ties == "stable":
            ranks[i, np.argsort(r, kind="stable")] = np.arange(len(r))
        else:
            ranks[i] = np.searchsorted(np.sort(r), r, side="left")
    return ranks.reshape(s.shape) / max(s.shape[-1] - 1, 1)


def mean_normalize(s: np.ndarray) -> np.ndarray:
    """Divide each row by its mean over finite cells (clipped at 1e-12); -inf cells stay -inf."""
    finite = np.isfinite(s)
    total = np.where(finite, s, 0.0).sum(axis=-1, keepdims=True)
    mean = total / np.maximum(finite.sum(axis=-1, keepdims=True), 1)
    return s / np.clip(mean, 1e-12, None)


NORMALIZERS = {Normalize.rank: rank_normalize, Normalize.mean: mean_normalize, Normalize.none: lambda s: s}


def normalize(s: np.ndarray, how: str, ties: str) -> np.ndarray:
    return rank_normalize(s, ties) if how == "rank" else NORMALIZERS[how](s)


@dataclass
class Outlier:
    cls: str
    layer: int  # index into the profile's MoE layers
    expert: int
    wnorm: float

    def as_dict(self, layers: list[int]) -> dict:
        w = self.wnorm if math.isfinite(self.wnorm) else str(self.wnorm)
        return {"class": self.cls, "layer": layers[self.layer], "expert": self.expert, "wnorm": w}


@dataclass
class Scores:
    agg: np.ndarray  # [L, E] keep score, higher = keep
    per_class: np.ndarray  # [C, L, E] what each class's top-K protection ranks by
    outliers: list[Outlier] = field(default_factory=list)


def treat_outliers(s: np.ndarray, wnorm: np.ndarray | None, mode: str, threshold: float | None,
                   classes: list[str]) -> tuple[np.ndarray, list[Outlier]]:
    """Per (class, layer) row: a cell is an outlier when s or wnorm is non-finite or |wnorm| > threshold
    (without wnorm — a count-only score — only non-finite cells are).

    keep: leave it (finite outliers only: a NaN has no rank, so non-finite cells are refused);
    median: the median of the row's clean cells (0 if none); drop: -inf (least support); zero: 0.
    """
    wnorm = np.zeros_like(s) if wnorm is None else wnorm
    bad = ~np.isfinite(s) | ~np.isfinite(wnorm)
    if threshold is not None:
        with np.errstate(invalid="ignore"):
            bad |= np.abs(wnorm) > threshold
    found = [Outlier(classes[c], int(l), int(e), float(wnorm[c, l, e])) for c, l, e in zip(*np.nonzero(bad))]
    if not found or mode == "keep":
        nonfinite = ~np.isfinite(s)
        if nonfinite.any():
            c, l, e = (int(i[0]) for i in np.nonzero(nonfinite))
            raise MoePruneError(
                f"strategy.outlier_mode=keep cannot rank non-finite scores ({int(nonfinite.sum())} cells, first: "
                f"class {classes[c]!r}, layer index {l}, expert {e}): expected outlier_mode=median, drop or zero"
            )
        return s, found
    out = s.copy()
    if mode == "median":
        clean = np.where(bad, np.nan, s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-bad row has no median: 0 below
            med = np.nanmedian(clean, axis=-1, keepdims=True)
        med = np.where(np.isfinite(med), med, 0.0)
        out = np.where(bad, np.broadcast_to(med, s.shape), s)
    else:
        out[bad] = -np.inf if mode == "drop" else 0.0
    return out, found


class Strategy:
    """Knobs every strategy has (StrategyConfig, above); subclasses implement `scores`. Built from
    its schema (`Schema`): the preset's, or the defaults with Python keywords over them."""

    Schema: type[StrategyConfig] = StrategyConfig
    # The reference score's knobs: a class aggregate sets them; a pooled baseline has none, and a
    # floor under it (floor_clamp) ranks by the reference score at ClassAggregateConfig's defaults
    # (2.0 * wnorm + count, non-finite cells replaced by the row median).
    _reference = ClassAggregateConfig()

    def __init__(self, cfg: StrategyConfig | None = None, **knobs):
        self.cfg = cfg = schema.make(self.Schema, cfg, knobs, "strategy")
        self.name = cfg.name
        self.normalize = Normalize.parse(cfg.normalize, f"strategy={self.name}: strategy.normalize")
        self.protect_top, self.protect_class_top = cfg.protect_top, cfg.protect_class_top
        self.rank_ties = RankTies.parse(cfg.rank_ties, f"strategy={self.name}: strategy.rank_ties",
                                        "stable (the reference's: ties ranked by expert id) or min (ties share the "
                                        "lowest rank)")
        ref = cfg if isinstance(cfg, ClassAggregateConfig) else self._reference
        self.alpha, self.breadth_bonus, self.outlier_threshold = ref.alpha, ref.breadth_bonus, ref.outlier_threshold
        self.score = Score.parse(ref.score, f"strategy={self.name}: strategy.score",
                                 "legacy (alpha*wnorm + count), mean (alpha*wnorm), reap, frequency or gate_mass")
        self.outlier_mode = OutlierMode.parse(ref.outlier_mode, f"strategy={self.name}: strategy.outlier_mode")

    def _bad(self, knob: str, value, expected: str) -> MoePruneError:
        return MoePruneError(f"strategy={self.name}: strategy.{knob}={value!r}: expected {expected}")

    def reference_needs(self) -> tuple[str, ...]:
        """What `reference_score` reads: wnorm only when alpha > 0 (so a profile without it, such as
        one of completion tokens, still drives a count-only score)."""
        if self.score not in _WNORM_SCORES:
            return BASE_SCORES[self.score]
        return (("wnorm",) if self.alpha else ()) + (("count",) if self.score == "legacy" else ())

    @property
    def needs(self) -> tuple[str, ...]:
        """The profile statistics `scores` reads (the single-criterion baselines name their own)."""
        return self.reference_needs()

    def outlier_signal(self, stats: dict[str, np.ndarray]) -> np.ndarray | None:
        """The wnorm the outlier rule inspects: none for a count-only score (alpha = 0), whose cells
        can only be non-finite; nor for the baselines' statistics, which do not read wnorm)."""
        return stats.get("wnorm") if self.alpha and self.score in _WNORM_SCORES else None

    def reference_score(self, stats: dict[str, np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
        """The per-class base score [C, L, E]: the reference's alpha * wnorm (+ routed count in
        legacy mode), or a baseline's statistic (BASE_SCORES). `weights` (default uniform) pool
        the routed count that reap's class shares divide by."""
        if self.score == "frequency":
            return stats["count"].astype(np.float64)
        if self.score == "gate_mass":
            return stats["gate_sum"].astype(np.float64)
        if self.score == "reap":
            w = np.ones(len(stats["count"])) if weights is None else weights
            pooled = np.tensordot(w, stats["count"], axes=1)
            return np.divide(stats["contrib_sum"], pooled, out=np.zeros_like(stats["contrib_sum"], dtype=np.float64),
                             where=pooled > 0)
        s = self.alpha * stats["wnorm"] if self.alpha else np.zeros_like(stats["count"])
        return s + stats["count"] if self.score == "legacy" else s

    def scores(self, stats: dict[str, np.ndarray], weights: np.ndarray, classes: list[str]) -> Scores:
        raise NotImplementedError


class ClassAggregate(Strategy):
    """The multi-class recipe; subclasses define `combine` (how weighted class scores merge)."""

    Schema = ClassAggregateConfig

    def __init__(self, cfg: ClassAggregateConfig | None = None, **knobs):
        super().__init__(cfg, **knobs)
        if self.alpha == 0 and self.score == Score.mean:
            raise self._bad("alpha", self.alpha, "> 0 with score=mean (alpha * wnorm would be 0 for every expert), "
                                                 "or score=legacy to rank by routed count alone")

    def combine(self, s: np.ndarray, w: np.ndarray) -> np.ndarray:  # s [C, L, E], w [C] -> [L, E]
        raise NotImplementedError

    def scores(self, stats, weights, classes):
        s, outliers = treat_outliers(self.reference_score(stats, weights), self.outlier_signal(stats), self.outlier_mode,
                                     self.outlier_threshold, classes)
        s = normalize(s, self.normalize, self.rank_ties)
        # A dropped outlier is "no support" for its class: -inf before ranking; 0 on the other scales.
        s = np.where(np.isneginf(s), 0.0, s)
        agg = self.combine(s, weights)
        if self.breadth_bonus:
            agg = agg + self.breadth_bonus * s.mean(axis=0)
        return Scores(agg, s, outliers)


class PooledCriterion(Strategy):
    """A single statistic pooled over the weighted classes; `normalize` then acts per layer, which
    only matters when a global keep budget compares layers."""

    def per_class(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def pooled(self, stats: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
        return np.tensordot(w, self.per_class(stats), axes=1)

    def scores(self, stats, weights, classes):
        per_class = self.per_class(stats)
        if not np.isfinite(per_class).all():
            raise MoePruneError(f"strategy={self.name}: the profile has non-finite statistics: expected finite values")
        return Scores(normalize(self.pooled(stats, weights), self.normalize, self.rank_ties), per_class)
