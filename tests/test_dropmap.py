"""Drop maps over random profiles (hypothesis): exact counts, protection, floors, determinism, tie
rules, normalization invariances; the map file schema both ways; bad maps refused."""

from __future__ import annotations

import json
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from moeprune.prune.strategies.base import ClassAggregateConfig, StrategyConfig
from moeprune.prune.strategies.random import RandomStrategyConfig
from moeprune.config import ClassWeightsConfig, FloorClampConfig, KeepConfig
from moeprune.errors import MoePruneError
from moeprune.presets import class_weight_presets
from moeprune.prune import recipe as dropmap
from moeprune.dropmap import DropMap
from moeprune.profile import Profile

STATS = ("count", "gate_sum", "contrib_sum", "wnorm")
STRATEGIES = ["max", "mean", "geomean", "sum", "frequency", "gate_mass", "reap", "random"]
TARGET = {"max": "MaxStrategy", "mean": "MeanStrategy", "geomean": "GeomeanStrategy", "sum": "SumStrategy",
          "frequency": "FrequencyStrategy", "gate_mass": "GateMassStrategy", "reap": "ReapStrategy",
          "random": "RandomStrategy"}
SCHEMA = {"max": ClassAggregateConfig, "mean": ClassAggregateConfig, "geomean": ClassAggregateConfig,
          "sum": ClassAggregateConfig, "random": RandomStrategyConfig}  # the rest: the pooled baselines
TOY = ["generic_math", "generic_logic", "generic_code", "generic_science", "generic_creative", "targeted_code_hard"]
FAST = settings(max_examples=60, deadline=None)


def make_profile(seed: int, C: int = 3, L: int = 3, E: int = 12, ties: bool = False, classes=None) -> Profile:
    rng = np.random.default_rng(seed)
    stats = {}
    for k in STATS:
        # integer-valued draws make exact ties between experts common, which the tie rules must handle
        x = rng.integers(1, 6, (C, L, E)) if ties else rng.gamma(1.0, 50.0, (C, L, E)) + 1e-3
        stats[k] = torch.tensor(x, dtype=torch.float64)
    return Profile(classes or [f"c{i}" for i in range(C)], list(range(0, 2 * L, 2)), E, stats, {})


def recipe(strategy="max", weights=None, floor=None, keep=None, **knobs):
    return dropmap.Recipe.of(
        OmegaConf.structured(SCHEMA.get(strategy, StrategyConfig)(
            _target_=f"moeprune.prune.strategies.{strategy}.{TARGET[strategy]}", name=strategy, **knobs)),
        OmegaConf.structured(ClassWeightsConfig(name="test", weights=weights or {})),
        OmegaConf.structured(FloorClampConfig(name="test", **(floor or {}))),
        OmegaConf.structured(KeepConfig(**(keep or {}))), weight_presets=class_weight_presets)


def read_map(path, layers, num_experts, top_k):
    return DropMap.read(path, lambda m: DropMap.parse(m, num_experts=num_experts, top_k=top_k, layers=layers,
                                                      physical=True))


def kept(result) -> list[set[int]]:
    return [set(range(result.num_experts)) - set(d) for d in result.dropped]


def strictly_above_kth(scores: np.ndarray, k: int) -> set[int]:
    """Experts that are in the top k whatever the tie rule: score > the k-th largest score."""
    if k == 0:
        return set()
    kth = np.sort(scores)[::-1][k - 1]
    return set(np.nonzero(scores > kth)[0].tolist())


knobs = st.fixed_dictionaries({
    "strategy": st.sampled_from(STRATEGIES),
    "normalize": st.sampled_from(["rank", "mean", "none"]),
    "protect_top": st.integers(0, 4),
    "breadth": st.sampled_from([0.0, 0.5]),
})


# ---- properties ---------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 10_000), k=knobs, keep=st.integers(2, 12), ties=st.booleans())
def test_exactly_keep_per_layer_protected_kept_and_deterministic(seed, k, keep, ties):
    p = make_profile(seed, ties=ties)
    breadth = {"breadth_bonus": k["breadth"]} if k["strategy"] in ("max", "mean", "geomean", "sum") else {}
    cfg = recipe(k["strategy"], normalize=k["normalize"], protect_top=min(k["protect_top"], keep),
                 keep={"experts_per_layer": keep}, **breadth)
    r = dropmap.build(p, cfg, top_k=2)
    assert all(len(s) == keep for s in kept(r))
    for layer, s in enumerate(kept(r)):
        assert strictly_above_kth(r.agg[layer], min(k["protect_top"], keep)) <= s
        assert r.protected[layer] <= s
        # nothing kept scores below anything dropped, unless protection put it there
        if r.dropped[layer]:
            assert all(r.agg[layer][e] >= r.agg[layer][r.dropped[layer]].max() for e in s - r.protected[layer])
    again = dropmap.build(p, cfg, top_k=2)
    assert again.as_json() == r.as_json() and again.summary == r.summary


@FAST
@given(seed=st.integers(0, 10_000), keep=st.integers(3, 12), K=st.integers(1, 3))
def test_every_weighted_class_keeps_its_top_k(seed, keep, K):
    from moeprune.prune.strategies.max import MaxStrategy

    p = make_profile(seed)
    weights = {"c0": 1.0, "c1": 0.0, "c2": 2.0}
    r = dropmap.build(p, recipe(protect_class_top=K, weights=weights, keep={"experts_per_layer": keep}), top_k=2)
    if 2 * K > keep:  # more protected than kept: trimmed, nothing more to check
        return
    per_class = MaxStrategy(name="max").scores({k: v.numpy() for k, v in p.stats.items()},
                                               np.array([1.0, 0.0, 2.0]), p.classes).per_class
    for layer, s in enumerate(kept(r)):
        for c in (0, 2):  # the weight-0 class protects nothing
            assert strictly_above_kth(per_class[c, layer], K) <= s


@FAST
@given(seed=st.integers(0, 10_000), keep=st.integers(2, 12), data=st.data())
def test_floor_map_counts_are_honoured(seed, keep, data):
    p = make_profile(seed)
    counts = data.draw(st.lists(st.integers(0, keep), min_size=3, max_size=3))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "floor.json"
        path.write_text(json.dumps({"floor_per_layer": {str(l): n for l, n in zip(p.layers, counts)}}))
        r = dropmap.build(p, recipe(floor={"map": str(path)}, keep={"experts_per_layer": keep}), top_k=2)
    floor_scores = (2.0 * p["wnorm"] + p["count"]).max(dim=0).values.numpy()  # pooled floor: max over classes
    for layer, (s, n) in enumerate(zip(kept(r), counts)):
        assert strictly_above_kth(floor_scores[layer], n) <= s
        assert r.summary["layers"][str(p.layers[layer])]["floor"] == n


@FAST
@given(seed=st.integers(0, 10_000), lo=st.integers(0, 6), width=st.integers(0, 6))
def test_floor_band_spans_lo_to_hi_by_layer_signal(seed, lo, width):
    p = make_profile(seed, L=4, E=16)
    hi, keep = lo + width, 12
    r = dropmap.build(p, recipe(floor={"band": [lo, hi]}, keep={"experts_per_layer": keep}), top_k=2)
    floors = [v["floor"] for v in r.summary["layers"].values()]
    signal = np.sort((2.0 * p["wnorm"] + p["count"]).max(dim=0).values.numpy(), axis=1)[:, -keep:].mean(1)
    assert all(lo <= f <= hi for f in floors)
    assert floors[int(signal.argmax())] == hi and floors[int(signal.argmin())] == lo
    assert all(floors[i] <= floors[j] for i in range(4) for j in range(4) if signal[i] < signal[j])


def test_band_ratio_scales_with_the_keep_count():
    from moeprune.prune.floor import _band

    cfg = OmegaConf.structured(FloorClampConfig(name="r", band_ratio=[0.245, 0.408]))
    assert _band(cfg, 98) == (24, 40) and _band(cfg, 62) == (15, 25) and _band(cfg, 12) == (3, 5)


@FAST
@given(seed=st.integers(0, 10_000), keep=st.integers(2, 11), n_base=st.integers(0, 10))
def test_ties_go_to_the_baseline_then_to_the_lower_id(seed, keep, n_base):
    E = 12
    p = make_profile(seed, E=E)
    for k in STATS:  # every expert of a layer identical: every score ties
        p.stats[k] = p.stats[k][:, :, :1].expand(-1, -1, E).clone()
    rng = np.random.default_rng(seed)
    base = {str(l): sorted(rng.choice(E, n_base, replace=False).tolist()) for l in p.layers}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.json"
        path.write_text(json.dumps(base))
        r = dropmap.build(p, recipe(keep={"experts_per_layer": keep, "baseline_map": str(path)}), top_k=2)
    for layer, d in zip(p.layers, r.dropped):
        b = base[str(layer)]
        expected = (b + [e for e in range(E) if e not in b])[:E - keep]
        assert d == sorted(expected)
        assert r.summary["layers"][str(layer)]["overlap_with_baseline"] == len(set(d) & set(b))
        assert r.summary["layers"][str(layer)]["boundary_ties_within_1pct"] == keep


@FAST
@given(seed=st.integers(0, 10_000), c=st.integers(0, 2), power=st.floats(0.2, 4.0), scale=st.floats(1e-3, 1e3))
def test_rank_normalization_ignores_monotone_rescaling_of_a_class(seed, c, power, scale):
    p = make_profile(seed)
    cfg = recipe(normalize="rank", score="mean", breadth_bonus=0.5, keep={"experts_per_layer": 8})
    q = make_profile(seed)
    q.stats["wnorm"][c] = scale * q.stats["wnorm"][c] ** power  # score=mean: s = alpha * wnorm
    assert dropmap.build(p, cfg, 2).as_json() == dropmap.build(q, cfg, 2).as_json()


@FAST
@given(seed=st.integers(0, 10_000), c=st.integers(0, 2), scale=st.floats(1e-3, 1e3))
def test_mean_normalization_ignores_scaling_a_class(seed, c, scale):
    p, q = make_profile(seed), make_profile(seed)
    for k in STATS:  # legacy score alpha*wnorm + count scales with both
        q.stats[k][c] *= scale
    cfg = recipe(normalize="mean", keep={"experts_per_layer": 8})
    a, b = dropmap.build(p, cfg, 2), dropmap.build(q, cfg, 2)
    np.testing.assert_allclose(a.agg, b.agg, rtol=1e-9)


@FAST
@given(seed=st.integers(0, 10_000), keep=st.integers(4, 10), lo=st.integers(2, 4), hi=st.integers(10, 12),
       protect=st.integers(0, 2))
def test_budget_mode_spends_exactly_the_budget_within_bounds(seed, keep, lo, hi, protect):
    p = make_profile(seed)
    cfg = recipe(protect_top=protect, keep={"experts_per_layer": keep, "mode": "budget",
                                           "min_per_layer": lo, "max_per_layer": hi})
    r = dropmap.build(p, cfg, top_k=2)
    counts = [len(s) for s in kept(r)]
    assert sum(counts) == keep * 3 and all(max(lo, protect) <= n <= hi for n in counts)
    assert all(r.protected[l] <= s for l, s in enumerate(kept(r)))
    # beyond its minimum a layer only keeps experts that beat everything another layer (not at its
    # maximum) dropped: the budget goes to the best scores across layers
    for l, s in enumerate(kept(r)):
        if len(s) > max(lo, len(r.protected[l])):
            lowest = min(r.agg[l][e] for e in s - r.protected[l])
            for m, d in enumerate(r.dropped):
                if d and counts[m] < hi:
                    assert lowest >= r.agg[m][d].max()
    DropMap.parse(r.as_json(), num_experts=p.num_experts, top_k=2, layers=p.layers, physical=False)
    with pytest.raises(MoePruneError, match="different expert counts") if len(set(counts)) > 1 else nullcontext():
        DropMap.parse(r.as_json(), num_experts=p.num_experts, top_k=2, layers=p.layers, physical=True)


def test_budget_mode_moves_experts_to_the_layer_that_scores_higher():
    p = make_profile(0, L=2, E=8)
    for k in STATS:
        p.stats[k][:, 1] *= 100  # layer 2 routes far more: with raw scores it wins the budget
    r = dropmap.build(p, recipe("frequency", normalize="none", keep={"experts_per_layer": 5, "mode": "budget"}), 2)
    assert [len(s) for s in kept(r)] == [2, 8]
    assert r.summary["keep_per_layer"] == {"0": 2, "2": 8} and r.summary["kept_total"] == 10


# ---- recipe inputs ------------------------------------------------------------------------------
def test_class_weights_unknown_class_names_profile_classes_and_toy_presets():
    p = make_profile(0, C=6, classes=TOY)
    with pytest.raises(MoePruneError) as e:
        dropmap.build(p, recipe(weights={"generic_code": 3.0, "targeted_lcb_medium_55": 2.0}), 2)
    msg = str(e.value)
    assert "unknown classes ['targeted_lcb_medium_55']" in msg and "generic_creative" in msg and "coder" in msg


@pytest.mark.parametrize("weights, default", [({"c0": 0.0, "c1": 0.0, "c2": 0.0}, 1.0), ({}, 0.0),
                                              ({"c0": -1.0}, 1.0), ({"c0": float("inf")}, 1.0)])
def test_class_weights_zero_sum_negative_or_infinite_refused(weights, default):
    cfg = recipe(weights=weights)
    cfg.class_weights.default = default
    with pytest.raises(MoePruneError, match="weights must be finite, >= 0 and not all 0"):
        dropmap.build(make_profile(0), cfg, 2)


@pytest.mark.parametrize("what, fill, message", [
    ("zero", 0.0, "class 'c1' is all zero in layers [2]"),
    ("nan", float("nan"), "class 'c1' is mostly non-finite in layers [2]"),
])
def test_broken_class_in_a_layer_is_refused_naming_class_and_layers(what, fill, message):
    p = make_profile(0)
    for k in ("count", "wnorm"):
        p.stats[k][1, 1, : 12 if what == "zero" else 7] = fill
    with pytest.raises(MoePruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dropmap.build(p, recipe(), 2)


def test_outliers_found_under_keep_are_not_reported_as_treated():
    p = make_profile(0)
    p.stats["wnorm"][2, 1, 5] = 1e9
    s = dropmap.build(p, recipe(outlier_mode="keep", outlier_threshold=1e4), 2).summary
    assert s["outliers"]["found"] == 1 and s["outliers"]["treated"] == 0
    assert all(v["outliers_treated"] == 0 for v in s["layers"].values())


def test_boundary_ties_count_only_kept_experts_just_above_the_best_dropped():
    # class c1 (tiny weight) protects its top expert 3, whose agg is the lowest of the layer
    p = make_profile(1, C=2, L=1, E=6)
    score = torch.tensor([[[10.0, 10.05, 20.0, 1.0, 30.0, 9.0]], [[0.0, 0.0, 0.0, 100.0, 0.0, 0.0]]],
                         dtype=torch.float64)
    p.stats = {k: score.clone() for k in p.stats}
    r = dropmap.build(p, recipe(normalize="none", alpha=1.0, score="mean", protect_class_top=1,
                                weights={"c0": 1.0, "c1": 0.001}), 2)
    assert r.dropped[0] == [0, 5] and 3 in r.protected[0]
    assert r.summary["layers"]["0"]["boundary_ties_within_1pct"] == 1  # 10.05 only, not the protected 1.0


def test_outliers_are_clamped_and_reported_per_layer():
    p = make_profile(0)
    p.stats["wnorm"][2, 1, 5] = 1e9  # a weight-norm artifact
    p.stats["wnorm"][0, 0, 3] = float("nan")
    r = dropmap.build(p, recipe(outlier_mode="median", outlier_threshold=1e4), 2)
    s = r.summary
    assert s["outliers"]["treated"] == 2 and s["layers"]["2"]["outliers_treated"] == 1
    assert {(c["class"], c["layer"], c["expert"]) for c in s["outliers"]["cells"]} == {("c2", 2, 5), ("c0", 0, 3)}
    json.dumps(s, allow_nan=False)  # the summary is strict JSON


@pytest.mark.parametrize("keep, message", [
    ({"experts_per_layer": 13}, "cannot keep 13 experts per layer"),
    ({"experts_per_layer": 1}, "top_k (2)"),
    ({"drop_fraction": 1.0}, "keep.drop_fraction=1.0"),
    ({"min_per_layer": 3}, "budget only"),
    ({"mode": "budget", "experts_per_layer": 6, "min_per_layer": 7}, "within [7, 12]"),
])
def test_bad_keep_targets(keep, message):
    with pytest.raises(MoePruneError) as e:
        dropmap.build(make_profile(0), recipe(keep=keep), 2)
    assert message in str(e.value)


@pytest.mark.parametrize("floor, content, message", [
    ({"top": 13}, None, "floor_clamp.top=13"),
    ({"band": [5, 3]}, None, "floor_clamp.band=[5, 3]"),
    ({"band": [2, 4], "band_ratio": [0.1, 0.2]}, None, "band or band_ratio, not both"),
    ({"top": 2, "band": [2, 4]}, None, "set one"),
    ({"profile": "/no/such/profile"}, None, "no floor count"),
    ({"map": "FILE"}, "{not json", "is not valid JSON"),
    ({"map": "FILE"}, {"0": 3, "2": 3}, "covers layers [0, 2], expected the profile's MoE layers [0, 2, 4]"),
    ({"map": "FILE"}, {"0": 3, "2": 3, "4": -1}, "[4]=-1: expected an integer >= 0"),
    ({"map": "FILE"}, {"0": 3, "2": 3, "4": 11}, "exceed the keep count 9"),
    ({"map": "FILE"}, {"floor_per_layer": {"0": 1, "2": 1, "4": 1}, "top98_mean_per_layer": {"0": 1.0}},
     "top98_mean_per_layer covers layers [0]"),
    ({"map": "FILE", "top": 3}, {"0": 3, "2": 3, "4": 3}, "map or top, not both"),
])
def test_bad_floor_inputs(tmp_path, floor, content, message):
    if content is not None:
        path = tmp_path / "floor.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        floor = {**floor, "map": str(path)}
    with pytest.raises(MoePruneError) as e:
        dropmap.build(make_profile(0), recipe(floor=floor, keep={"experts_per_layer": 9}), 2)
    assert message in str(e.value)


def test_floor_map_signal_drives_the_band_and_flat_maps_work(tmp_path):
    p = make_profile(0)
    path = tmp_path / "floor.json"
    path.write_text(json.dumps({"floor_per_layer": {"0": 9, "2": 0, "4": 0},
                                "top98_mean_per_layer": {"0": 1.0, "2": 3.0, "4": 2.0}}))
    r = dropmap.build(p, recipe(floor={"map": str(path), "band": [2, 6]}, keep={"experts_per_layer": 9}), 2)
    assert [v["floor"] for v in r.summary["layers"].values()] == [2, 6, 4]
    path.write_text(json.dumps({"0": 1, "2": 2, "4": 3}))
    r = dropmap.build(p, recipe(floor={"map": str(path)}, keep={"experts_per_layer": 9}), 2)
    assert [v["floor"] for v in r.summary["layers"].values()] == [1, 2, 3]


def test_floor_profile_must_match_the_run(tmp_path):
    make_profile(1, L=2).save(tmp_path)
    with pytest.raises(MoePruneError, match=r"floor_clamp.profile=\S+: layers \[0, 2\] x 12 experts, expected the run"):
        dropmap.build(make_profile(0), recipe(floor={"profile": str(tmp_path), "top": 2}), 2)
    make_profile(1).save(tmp_path)
    r = dropmap.build(make_profile(0), recipe(floor={"profile": str(tmp_path), "top": 4}), 2)
    other = (2.0 * make_profile(1)["wnorm"] + make_profile(1)["count"]).max(dim=0).values.numpy()
    assert all(strictly_above_kth(other[l], 4) <= s for l, s in enumerate(kept(r)))


# ---- map files ----------------------------------------------------------------------------------
def test_map_round_trips_with_the_reference_schema(tmp_path):
    # the reference tools write {"<layer>": [dropped ids]}, keys as strings, ids ascending
    reference = {"0": [1, 4, 7], "2": [0, 5, 11], "4": [2, 3, 9]}
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    read = read_map(tmp_path / "ref.json", [0, 2, 4], 12, 2)
    assert read == {0: [1, 4, 7], 2: [0, 5, 11], 4: [2, 3, 9]}

    r = dropmap.build(make_profile(3), recipe(keep={"experts_per_layer": 9}), 2)
    dropmap.write(tmp_path / "out", r)
    ours = json.loads((tmp_path / "out" / dropmap.DROP_MAP_FILE).read_text())
    assert list(ours) == ["0", "2", "4"] and all(v == sorted(v) and len(v) == 3 for v in ours.values())
    assert {str(k): v for k, v in read_map(tmp_path / "out" / dropmap.DROP_MAP_FILE, [0, 2, 4], 12, 2).items()} == ours
    # a map read from the reference and written back is byte-for-byte the reference's content
    from moeprune import artifacts

    artifacts.write_json(tmp_path / "back.json", {str(k): v for k, v in read.items()})
    assert json.loads((tmp_path / "back.json").read_text()) == reference
    assert (tmp_path / "out" / dropmap.HEATMAP_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "out" / dropmap.SUMMARY_FILE).read_text())
    assert set(summary["layers"]["0"]) >= {"agg_min", "agg_max", "agg_mean", "boundary_ties_within_1pct",
                                           "protected", "floor", "overlap_with_baseline", "outliers_treated"}


BAD_MAPS = [
    ("{\"0\": [1, 2", "is not valid JSON"),
    ("[[1, 2]]", "must be a JSON object"),
    (json.dumps({"0": [1], "2": [1]}), "covers 2 layers [0, 2], expected the model's 3 MoE layers [0, 2, 4]"),
    (json.dumps({"0": [1], "2": [1], "4": [1], "6": [1]}), "names layer 6, but the model's MoE layers are [0, 2, 4]"),
    (json.dumps({"0": [1, 1], "2": [1, 2], "4": [1, 2]}), "layer 0: duplicate expert ids [1]"),
    (json.dumps({"0": [1, 12], "2": [1, 2], "4": [1, 2]}), "expert ids [12] out of range 0..11"),
    (json.dumps({"0": list(range(11)), "2": list(range(11)), "4": list(range(11))}), "keeps 1 experts, fewer than top_k=2"),
    (json.dumps({"0": [1.5], "2": [1], "4": [1]}), "expected a list of integer expert ids"),
    (json.dumps({"x": [1], "2": [1], "4": [1]}), "key 'x' is not a layer index"),
]


@pytest.mark.parametrize("content, message", BAD_MAPS)
def test_bad_map_files_are_refused_and_nothing_is_written(tmp_path, content, message):
    path = tmp_path / "base.json"
    path.write_text(content)
    with pytest.raises(MoePruneError) as e:
        read_map(path, [0, 2, 4], 12, 2)
    assert message in str(e.value) and str(path) in str(e.value)
    # as a recipe's baseline map: the build fails before anything exists to write
    with pytest.raises(MoePruneError, match="base.json"):
        dropmap.build(make_profile(0), recipe(keep={"baseline_map": str(path)}), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.json"]


def test_missing_map_file():
    with pytest.raises(MoePruneError, match="drop map not found: /no/such.json"):
        read_map("/no/such.json", [0], 12, 2)


def test_a_profile_imported_from_the_reference_json_drives_the_reference_strategies():
    from moeprune.prune.profile.reference_json import from_reference

    rng = np.random.default_rng(0)
    ref = {"categories": {c: {str(layer): [{"id": e, "wnorm": float(rng.gamma(1, 50)), "rnorm": 1.0, "wsum": 0.5,
                                            "tc": int(rng.integers(1, 99)), "cc": 3} for e in range(12)]
                              for layer in (0, 2, 4)} for c in ("c0", "c1", "c2")}}
    p = from_reference(ref)  # five statistics: no gate_sum / contrib_sum
    r = dropmap.build(p, recipe(protect_top=2, keep={"experts_per_layer": 9}), 2)
    assert all(len(d) == 3 for d in r.dropped)
    with pytest.raises(MoePruneError, match=r"profile lacks statistics \['gate_sum'\]"):
        dropmap.build(p, recipe("gate_mass", normalize="none"), 2)


def test_a_count_only_profile_drives_alpha_zero_and_names_what_is_missing_otherwise():
    p = make_profile(0)
    del p.stats["wnorm"]  # e.g. a completion profile: additive statistics only
    r = dropmap.build(p, recipe(alpha=0.0, keep={"experts_per_layer": 9}), 2)
    q = make_profile(0)
    q.stats["wnorm"] = torch.zeros_like(q.stats["count"])  # alpha*0 + count: the same ranking
    assert r.as_json() == dropmap.build(q, recipe(keep={"experts_per_layer": 9}), 2).as_json()
    with pytest.raises(MoePruneError, match=r"profile lacks statistics \['wnorm'\]"):
        dropmap.build(p, recipe(), 2)
    with pytest.raises(MoePruneError, match=r"floor profile lacks statistics \['wnorm'\]"):
        with tempfile.TemporaryDirectory() as d:
            p.save(Path(d))
            dropmap.build(make_profile(1), recipe(floor={"profile": d, "top": 2}), 2)


def test_a_missing_floor_map_profile_or_baseline_names_the_override_that_drops_it():
    cases = [({"floor": {"map": "/no/floor.json"}}, "floor_clamp.map=null runs without it"),
             ({"floor": {"profile": "/no/floor_profile", "top": 2}}, "floor_clamp.profile=null ranks the floor"),
             ({"keep": {"baseline_map": "/no/base.json"}}, "keep.baseline_map=null runs without it")]
    for knobs, hint in cases:
        with pytest.raises(MoePruneError, match=hint):
            dropmap.build(make_profile(0), recipe(**knobs), 2)


def test_unknown_classes_name_the_weight_presets_that_fit_the_profile():
    p = make_profile(0, C=6, classes=TOY)  # the toy world's six classes
    with pytest.raises(MoePruneError) as e:
        dropmap.build(p, recipe(weights={"targeted_humaneval": 2.0}), 2)
    assert "unknown classes ['targeted_humaneval']" in str(e.value)
    fitting = str(e.value).split("presets that fit: class_weights=")[1].split(" / ")
    assert {"uniform", "five_class", "coder", "toy_lcb_only"} <= set(fitting) and "v7_coder" not in fitting


@FAST
@given(seed=st.integers(0, 10_000), baseline=st.sampled_from(["reap", "frequency", "gate_mass"]),
       keep=st.integers(2, 11), weights=st.sampled_from([None, {"c0": 1.0, "c1": 0.25, "c2": 3.0}, {"c1": 0.0}]),
       ties=st.booleans(), mode=st.sampled_from(["uniform", "budget"]))
def test_the_class_weighted_recipe_with_a_baselines_score_reproduces_that_baselines_map(
        seed, baseline, keep, weights, ties, mode):
    # sum over the weighted classes, no normalization: the recipe space holds REAP, frequency, gate mass.
    # REAP's class shares sum in another order than its ratio of sums, so exact ties between
    # experts (integer statistics) can round apart: exact for continuous statistics, as profiled.
    p = make_profile(seed, ties=ties and baseline != "reap")
    keep_cfg = {"experts_per_layer": keep, "mode": mode, "min_per_layer": 2 if mode == "budget" else None}
    want = dropmap.build(p, recipe(baseline, weights=weights, normalize="none", keep=keep_cfg), top_k=2)
    got = dropmap.build(p, recipe("sum", weights=weights, normalize="none", score=baseline, keep=keep_cfg), top_k=2)
    assert got.dropped == want.dropped
    np.testing.assert_allclose(got.agg, want.agg, rtol=1e-12)


@pytest.mark.parametrize("score, reads", [("reap", {"contrib_sum", "count"}), ("frequency", {"count"}),
                                          ("gate_mass", {"gate_sum"})])
def test_a_baselines_score_inside_max_reads_only_that_baselines_statistics(score, reads):
    p = make_profile(3)
    for k in set(STATS) - reads:
        del p.stats[k]
    r = dropmap.build(p, recipe("max", score=score, alpha=3.0, keep={"experts_per_layer": 6}), top_k=2)
    assert all(len(d) == 6 for d in r.dropped)
