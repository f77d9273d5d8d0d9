"""Strategies: each formula on hand-computed numbers, normalization, outliers, knob validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeprune.config import build
from moeprune.presets import preset
from moeprune.errors import MoePruneError
from moeprune.prune import floor
from moeprune.prune.strategies.base import mean_normalize, rank_normalize, treat_outliers
from moeprune.prune.strategies.frequency import FrequencyStrategy
from moeprune.prune.strategies.gate_mass import GateMassStrategy
from moeprune.prune.strategies.geomean import GeomeanStrategy
from moeprune.prune.strategies.max import MaxStrategy
from moeprune.prune.strategies.mean import MeanStrategy
from moeprune.prune.strategies.random import RandomStrategy
from moeprune.prune.strategies.reap import ReapStrategy
from moeprune.prune.strategies.sum import SumStrategy

CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy"
CLASSES = ["a", "b"]


def stats(wnorm, count=None, **extra):
    wnorm = np.asarray(wnorm, dtype=np.float64)
    out = {"wnorm": wnorm, "count": np.zeros_like(wnorm) if count is None else np.asarray(count, dtype=np.float64)}
    return {**out, **{k: np.asarray(v, dtype=np.float64) for k, v in extra.items()}}


# two classes, one layer, three experts; score=mean, alpha=1 -> s = wnorm
S = [[[1.0, 2.0, 4.0]], [[3.0, 1.0, 1.0]]]
W = np.array([1.0, 2.0])


@pytest.mark.parametrize("cls, expected", [
    (MaxStrategy, [6.0, 2.0, 4.0]),  # max(1*s_a, 2*s_b)
    (SumStrategy, [7.0, 4.0, 6.0]),
    (MeanStrategy, [7 / 3, 4 / 3, 2.0]),
    (GeomeanStrategy, [(1 * 3.0**2) ** (1 / 3), (2 * 1.0**2) ** (1 / 3), (4 * 1.0**2) ** (1 / 3)]),
])
def test_aggregates_match_their_formulas(cls, expected):
    st = cls(name="x", normalize="none", alpha=1.0, score="mean")
    agg = st.scores(stats(S), W, CLASSES).agg
    np.testing.assert_allclose(agg[0], expected)


def test_legacy_score_adds_counts_and_alpha_multiplies():
    st = SumStrategy(name="sum", normalize="none", alpha=2.0, score="legacy")
    agg = st.scores(stats(S, count=[[[10, 0, 0]], [[0, 0, 5]]]), np.ones(2), CLASSES).agg
    np.testing.assert_allclose(agg[0], [2 * 4 + 10, 2 * 3, 2 * 5 + 5])


def test_breadth_bonus_adds_the_unweighted_class_mean_of_normalized_scores():
    plain = MaxStrategy(name="max", normalize="rank", alpha=1.0, score="mean")
    bonus = MaxStrategy(name="max", normalize="rank", alpha=1.0, score="mean", breadth_bonus=0.5)
    a, b = plain.scores(stats(S), W, CLASSES), bonus.scores(stats(S), W, CLASSES)
    ranks = np.array([[[0, 0.5, 1]], [[1, 0, 0]]])  # the ranks of S per row (ties share the lowest)
    np.testing.assert_allclose(b.agg - a.agg, 0.5 * ranks.mean(axis=0))


def test_geomean_lets_one_weak_class_veto_an_expert():
    # expert 0 is the best of class a and the worst of class b: max keeps it first, geomean last
    s = stats([[[9.0, 5.0, 4.0]], [[1.0, 5.0, 4.0]]])
    mx = MaxStrategy(name="max", normalize="none", alpha=1.0, score="mean").scores(s, np.ones(2), CLASSES).agg[0]
    gm = GeomeanStrategy(name="geomean", normalize="none", alpha=1.0, score="mean").scores(s, np.ones(2), CLASSES).agg[0]
    assert mx.argmax() == 0 and gm.argmin() == 0


def test_rank_and_mean_normalize():
    np.testing.assert_allclose(rank_normalize(np.array([3.0, 1.0, 2.0])), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(rank_normalize(np.array([2.0, 2.0, 1.0, 0.0])), [2 / 3, 2 / 3, 1 / 3, 0])  # ties share
    np.testing.assert_allclose(rank_normalize(np.array([[[0.0, 5.0, 0.0]]])), [[[0.0, 1.0, 0.0]]])
    np.testing.assert_allclose(mean_normalize(np.array([1.0, 2.0, 3.0])), [0.5, 1.0, 1.5])
    np.testing.assert_allclose(mean_normalize(np.array([-np.inf, 2.0, 4.0]))[1:], [2 / 3, 4 / 3])


def test_frequency_gate_mass_and_reap_pool_over_weighted_classes():
    s = stats(np.zeros((2, 1, 3)), count=[[[4, 0, 2]], [[2, 6, 0]]],
              gate_sum=[[[1, 0, 2]], [[1, 3, 0]]], contrib_sum=[[[8, 0, 2]], [[2, 12, 0]]])
    w = np.array([1.0, 3.0])
    np.testing.assert_allclose(FrequencyStrategy(name="f", normalize="none").scores(s, w, CLASSES).agg[0], [10, 18, 2])
    np.testing.assert_allclose(GateMassStrategy(name="g", normalize="none").scores(s, w, CLASSES).agg[0], [4, 9, 2])
    # reap: sum w*contrib / sum w*count, 0 for an expert never routed
    reap = ReapStrategy(name="r", normalize="none").scores(s, w, CLASSES)
    np.testing.assert_allclose(reap.agg[0], [(8 + 6) / (4 + 6), 36 / 18, 2 / 2])
    np.testing.assert_allclose(reap.per_class[:, 0], [[2, 0, 1], [1, 2, 0]])


def test_random_is_seeded():
    s = stats(np.zeros((2, 3, 16)))
    a = RandomStrategy(name="r", seed=1).scores(s, np.ones(2), CLASSES).agg
    assert np.array_equal(a, RandomStrategy(name="r", seed=1).scores(s, np.ones(2), CLASSES).agg)
    assert not np.array_equal(a, RandomStrategy(name="r", seed=2).scores(s, np.ones(2), CLASSES).agg)


@pytest.mark.parametrize("mode, expected", [
    ("median", [1.0, 2.0, 3.0, 2.0, 2.0]),  # the median of the row's clean cells 1, 2, 3
    ("zero", [1.0, 2.0, 3.0, 0.0, 0.0]),
    ("drop", [1.0, 2.0, 3.0, -np.inf, -np.inf]),
    ("keep", [1.0, 2.0, 3.0, 5e4, 7.0]),
])
def test_outlier_modes(mode, expected):
    w = np.array([[[1.0, 2.0, 3.0, 5e4, 7.0]]])
    s = w.copy()
    if mode != "keep":
        s[0, 0, 4] = w[0, 0, 4] = np.nan
    out, found = treat_outliers(s, w, mode, 1e4, ["a"])
    np.testing.assert_array_equal(out[0, 0], expected)
    assert [(o.cls, o.expert) for o in found] == ([("a", 3)] if mode == "keep" else [("a", 3), ("a", 4)])


def test_outlier_keep_refuses_non_finite_and_threshold_only_when_set():
    w = np.array([[[1.0, np.inf]]])
    with pytest.raises(MoePruneError, match="outlier_mode=keep cannot rank non-finite.*class 'a'"):
        treat_outliers(w, w, "keep", None, ["a"])
    big = np.array([[[1.0, 5e4]]])
    assert treat_outliers(big, big, "median", None, ["a"])[1] == []


def test_median_clamp_stops_an_artifact_from_topping_the_ranking():
    w = np.array([[[1.0, 2.0, 3.0, 4.0, 9e9]]])  # a bf16 weight-norm artifact on expert 4
    keep = MaxStrategy(name="max", alpha=1.0, score="mean", outlier_mode="keep", outlier_threshold=1e4)
    med = MaxStrategy(name="max", alpha=1.0, score="mean", outlier_mode="median", outlier_threshold=1e4)
    assert keep.scores(stats(w), np.ones(1), ["a"]).agg[0].argmax() == 4
    assert med.scores(stats(w), np.ones(1), ["a"]).agg[0].argmax() == 3


def test_a_count_only_score_ignores_the_weight_norm_threshold():
    w = np.array([[[1.0, 2.0, 3.0, 4.0, 9e9]]])  # finite wnorm far above the threshold: not read at alpha=0
    counts = MaxStrategy(name="max", alpha=0.0, score="legacy", outlier_threshold=1e4)
    s = counts.scores(stats(w, count=[[[1.0, 2.0, 3.0, 4.0, 5.0]]]), np.ones(1), ["a"])
    assert s.outliers == [] and s.agg[0].argmax() == 4


@pytest.mark.parametrize("cls, kwargs, message", [
    (MaxStrategy, {"normalize": "zscore"}, "strategy.normalize='zscore': expected one of rank, mean, none"),
    (MaxStrategy, {"alpha": 0.0, "score": "mean"}, "alpha * wnorm would be 0 for every expert"),
    (MaxStrategy, {"score": "fancy"}, "strategy.score='fancy'"),
    (MaxStrategy, {"alpha": -1.0}, "strategy.alpha=-1.0: expected a finite number >= 0"),
    (MaxStrategy, {"breadth_bonus": float("nan")}, "strategy.breadth_bonus"),
    (MaxStrategy, {"protect_top": -2}, "strategy.protect_top=-2"),
    (MaxStrategy, {"protect_class_top": -1}, "strategy.protect_class_top=-1"),
    (MaxStrategy, {"outlier_mode": "clip"}, "strategy.outlier_mode='clip': expected one of keep, median, drop, zero"),
    (MaxStrategy, {"outlier_threshold": 0.0}, "strategy.outlier_threshold=0.0"),
])
def test_bad_knobs_name_the_knob_and_the_expectation(cls, kwargs, message):
    with pytest.raises(MoePruneError) as e:
        cls(name="x", **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("cls, knob", [(FrequencyStrategy, "breadth_bonus"), (ReapStrategy, "alpha"),
                                       (GateMassStrategy, "outlier_mode"), (MaxStrategy, "seed"),
                                       (RandomStrategy, "score")])
def test_a_strategy_takes_only_the_knobs_of_its_own_schema(cls, knob):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{knob}'"):
        cls(name="x", **{knob: 1})


def test_a_floor_under_a_baseline_ranks_by_the_reference_score_at_its_defaults():
    s = stats([[[4, 1, 0]], [[2, 3, 1]]], [[[1.0, 2.0, 3.0]], [[0.5, 0.5, 0.5]]])
    reap, default_max = ReapStrategy(name="reap"), MaxStrategy(name="max")
    assert (reap.alpha, reap.score, reap.outlier_mode, reap.outlier_threshold) == (2.0, "legacy", "median", None)
    np.testing.assert_array_equal(floor.floor_scores(s, reap, CLASSES), floor.floor_scores(s, default_max, CLASSES))
    np.testing.assert_allclose(floor.floor_scores(s, reap, CLASSES)[0], [9.0, 6.5, 3.0])  # max_c 2*wnorm + count


def test_every_strategy_preset_instantiates_its_own_file():
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert names == ["frequency", "gate_mass", "geomean", "max", "mean", "random", "reap", "sum"]
    for name in names:
        st = build(preset("strategy", name))
        assert st.name == name and type(st).__module__ == f"moeprune.prune.strategies.{name}"


def test_a_strategy_given_another_strategys_schema_is_refused_not_stripped_of_its_knobs():
    from moeprune.prune.strategies.base import ClassAggregateConfig
    from moeprune.prune.strategies.reap import ReapStrategy

    with pytest.raises(MoePruneError, match="strategy: its knobs are a ClassAggregateConfig, but strategy's class "
                                            "takes a StrategyConfig"):
        ReapStrategy(ClassAggregateConfig(alpha=3.0))
