"""The two rank tie rules (strategy.rank_ties) on hand-computed profiles whose zero-count ties reach
the keep boundary: every expected map below is worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omegaconf.errors import ValidationError

from moeprune.errors import MoePruneError
from moeprune.prune import recipe as dropmap
from moeprune.profile import Profile
from moeprune.prune.selection import drop_order, keep_order
from moeprune.prune.strategies.base import rank_normalize
from moeprune.prune.strategies.max import MaxStrategy
from test_dropmap import recipe


def count_profile(counts: list[list[float]]) -> Profile:
    """One layer; per class the routed counts of each expert (wnorm 0, so alpha*wnorm + count = count)."""
    count = torch.tensor([[row] for row in counts], dtype=torch.float64)
    return Profile([f"c{i}" for i in range(len(counts))], [0], count.shape[-1],
                   {"count": count, "wnorm": torch.zeros_like(count)}, {})


def test_stable_ranks_grow_with_the_id_among_ties_and_min_ranks_share_the_lowest():
    x = np.array([2.0, 2.0, 1.0, 0.0])
    # stable ascending order: 3 (0.0), 2 (1.0), 0, 1 (2.0 twice, lower id first) -> ranks 2, 3, 1, 0
    np.testing.assert_allclose(rank_normalize(x, "stable"), [2 / 3, 1, 1 / 3, 0])
    np.testing.assert_allclose(rank_normalize(x, "min"), [2 / 3, 2 / 3, 1 / 3, 0])


def test_a_stable_descending_sort_keeps_the_lower_id_first_unlike_the_ascending_one_reversed():
    x = np.array([0.0, 1.0, 1.0, 0.0])
    assert drop_order(x, set(), "stable").tolist() == [0, 3, 1, 2]
    assert keep_order(x, set(), "stable").tolist() == [1, 2, 0, 3]  # argsort(-x, kind="stable")
    assert drop_order(x, set(), "stable")[::-1].tolist() == [2, 1, 3, 0]  # not the same order
    # min: one order for both directions; the baseline's dropped experts go first among equals
    assert drop_order(x, {3}, "min").tolist() == [3, 0, 1, 2]
    assert keep_order(x, {3}, "min").tolist() == [2, 1, 0, 3]
    # stable ignores the baseline: the reference only reports the overlap with it
    assert drop_order(x, {3}, "stable").tolist() == [0, 3, 1, 2]


# Two classes, five experts, keep 4. Expert 4 is routed by neither... almost: class a sends it
# nothing while it routes every other expert; class b routes only expert 2.
#   a = [1, 2, 3, 4, 0]   no ties: ranks 1 2 3 4 0          -> /4: .25 .5 .75 1 0
#   b = [0, 0, 5, 0, 0]   stable: order 0 1 3 4 2, so ranks 0 1 4 2 3 -> /4: 0 .25 1 .5 .75
#                         min:    zeros share rank 0        -> /4: 0 0 1 0 0
#   max over classes, stable: .25 .5 1 1 .75 -> the lowest is expert 0: it is dropped
#   max over classes, min:    .25 .5 1 1 0   -> the lowest is expert 4: it is dropped
ZERO_TIES = [[1, 2, 3, 4, 0], [0, 0, 5, 0, 0]]


@pytest.mark.parametrize("ties, dropped", [("stable", [0]), ("min", [4])])
def test_zero_count_ties_give_each_rule_its_own_map(ties, dropped):
    r = dropmap.build(count_profile(ZERO_TIES), recipe(rank_ties=ties, keep={"experts_per_layer": 4}), 2)
    assert r.as_json() == {"0": dropped}


# One class, counts [3, 3, 3, 0], protect_top 1, keep 2 (normalize none: agg = count).
#   stable: protected = first of argsort(-agg, stable) = expert 0; drop order 3, 0, 1, 2 without 0
#           -> drops 3 and 1
#   min:    protected = first of the reversed drop order (2, 1, 0, 3) = expert 2; drop order
#           3, 0, 1 -> drops 3 and 0
@pytest.mark.parametrize("ties, dropped", [("stable", [1, 3]), ("min", [0, 3])])
def test_protect_top_among_equal_scores_follows_the_rule(ties, dropped):
    r = dropmap.build(count_profile([[3, 3, 3, 0]]),
                      recipe(rank_ties=ties, normalize="none", protect_top=1, keep={"experts_per_layer": 2}), 2)
    assert r.as_json() == {"0": dropped}


# A floor of 1 from the run's own pooled score (max over classes of count): [2, 2, 0, 0]; agg
# (normalize none, max) is the same; keep 1, so three go.
#   stable: floor = argsort(-f, stable)[:1] = expert 0; drop order 2, 3, 0, 1 without 0 -> 2, 3, 1
#   min:    floor = first of the reversed drop order 1, 0, 3, 2 = expert 1 -> drops 2, 3, 0
@pytest.mark.parametrize("ties, dropped", [("stable", [1, 2, 3]), ("min", [0, 2, 3])])
def test_the_floor_top_k_among_equal_scores_follows_the_rule(ties, dropped):
    r = dropmap.build(count_profile([[2, 2, 0, 0]]),
                      recipe(rank_ties=ties, normalize="none", floor={"top": 1}, keep={"experts_per_layer": 1}), 1)
    assert r.as_json() == {"0": dropped}


def test_stable_ignores_the_baseline_map_at_the_boundary_and_min_follows_it(tmp_path):
    # one class, counts [1, 1, 5, 5] (normalize none: agg = count), baseline dropped {1}, keep 3:
    # one of the tied experts 0 and 1 goes. stable: the lower id (0); min: the baseline's (1)
    base = tmp_path / "base.json"
    base.write_text('{"0": [1]}')
    for ties, dropped in (("stable", [0]), ("min", [1])):
        r = dropmap.build(count_profile([[1, 1, 5, 5]]), recipe(rank_ties=ties, normalize="none",
                                                                keep={"experts_per_layer": 3, "baseline_map": str(base)}), 2)
        assert r.as_json() == {"0": dropped}


def test_an_unknown_tie_rule_is_refused_naming_the_choices():
    with pytest.raises(ValidationError, match=r"Invalid value 'first', expected one of \[stable, min\]"):
        dropmap.build(count_profile(ZERO_TIES), recipe(rank_ties="first"), 2)
    with pytest.raises(MoePruneError, match=r"strategy.rank_ties='first': expected stable .* or min"):
        MaxStrategy(name="max", rank_ties="first")  # built without the schema


def test_every_published_recipe_uses_the_reference_rule_and_the_toy_recipes_keep_min():
    from test_dropmap_stage import _compose

    for name in ("v3_pooled", "v4", "v5_coder", "v6_coder", "v7_coder", "v7_coderx"):
        assert _compose([f"recipe={name}"]).strategy.rank_ties == "stable", name
    for name in ("toy_v3_pooled", "toy_v4", "toy_v6_coder", "toy_v7_coderx", "toy_coder"):
        assert _compose([f"recipe={name}"]).strategy.rank_ties == "min", name
