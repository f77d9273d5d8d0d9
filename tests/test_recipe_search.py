"""benchmarks/recipe_search.py: its statistics, and the physical checkpoint equal to the virtual trial."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_search as rs  # noqa: E402

from moeprune.dropmap import DropMap  # noqa: E402
from moeprune.prune.surgery import prune_checkpoint  # noqa: E402


def test_wilson_interval_matches_the_closed_form_for_81_of_100():
    lo, hi = rs.wilson(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-4) and hi == pytest.approx(0.8749, abs=1e-4)


def test_mcnemar_counts_only_discordant_pairs_and_is_exact():
    a = {str(i): i < 8 for i in range(20)}   # 8 passes
    b = {str(i): i < 2 for i in range(20)}   # 2 passes, both shared: 6 discordant, all for a
    diff, p = rs.mcnemar(a, b)
    assert diff == pytest.approx(6 / 20) and p == pytest.approx(2 * 0.5 ** 6)
    c = {str(i): 1 <= i < 10 for i in range(20)}  # against a: 1 only a (id 0), 2 only c (ids 8, 9)
    diff, p = rs.mcnemar(a, c)  # two-sided: 2 * P(X <= 1 | n=3) = 2 * (1 + 3) / 8, capped at 1
    assert diff == pytest.approx(-1 / 20) and p == 1.0
    d = {str(i): i < 15 for i in range(20)}
    d["0"] = False
    diff, p = rs.mcnemar(d, a)  # 7 only d (8..14), 1 only a (0): 2 * (1 + 8) / 256
    assert diff == pytest.approx(6 / 20) and p == pytest.approx(2 * 9 / 256)


def test_a_searched_maps_pruned_checkpoint_gives_the_virtual_trials_greedy_outputs(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), model=str(rs.PKG_DIR / "toy" / "model"),
                              device="cpu", calib=8, batch_size=64, score_tokens="completion")
    lab = rs.Lab(args)
    m = lab.drop_map(["keep.drop_fraction=0.5", "strategy=gate_mass"])
    virtual = lab.score(m, "test", 4)
    ckpt = tmp_path / "ckpt"
    prune_checkpoint(lab.model_dir, ckpt, DropMap.parse(m.as_json(), num_experts=lab.profile.num_experts,
                                                        top_k=lab.top_k, physical=True))
    physical = lab.score(None, "test", 4, model_dir=ckpt)
    assert {i: r["completion"] for i, r in physical.items()} == {i: r["completion"] for i, r in virtual.items()}
