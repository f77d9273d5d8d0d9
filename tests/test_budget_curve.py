"""benchmarks/budget_curve.py: its rows are points of the searched space that give the presets' own
maps (so the study nests them), at every keep count of the curve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import budget_curve as bc  # noqa: E402
import recipe_search as rs  # noqa: E402

PRESETS = {  # each row as a user writes it
    "max-uniform (default)": [], "REAP": ["strategy=reap"], "frequency": ["strategy=frequency"],
    "gate mass": ["strategy=gate_mass"], "toy_v4": ["recipe=toy_v4"], "toy_v6_coder": ["recipe=toy_v6_coder"],
    "toy_v7_coderx": ["recipe=toy_v7_coderx"], "REAP, coder": ["strategy=reap", "class_weights=coder"],
    "frequency, coder": ["strategy=frequency", "class_weights=coder"],
    "gate mass, coder": ["strategy=gate_mass", "class_weights=coder"], "toy_coder (max, coder)": ["recipe=toy_coder"],
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget_curve")
    return rs.Lab(argparse.Namespace(out=str(out), model=str(rs.PKG_DIR / "toy" / "model"),
                                     device="cpu", calib=8, batch_size=64, score_tokens="completion"))


def test_every_row_of_the_budget_curve_is_a_point_of_its_space_with_the_presets_map(lab):
    assert list(PRESETS) == list(bc.ROWS)
    for keep in (12, 8, 5, 3):
        for name, written in PRESETS.items():
            point = lab.drop_map(bc.overrides(bc.ROWS[name], keep)).as_json()
            assert point == lab.drop_map([*written, f"keep.experts_per_layer={keep}"]).as_json(), (keep, name)
            assert all(len(v) == 16 - keep for v in point.values())
    # the published analogs keep their own shared-FFN scale
    assert [bc.ROWS[n]["shared_ffn_alpha"] for n in ("toy_v4", "toy_v6_coder", "toy_v7_coderx")] == [1.0, 1.2, 1.2]


def test_the_curves_profile_counts_only_answer_producing_positions(lab):
    full = rs.toy_recipes.pipeline_profile(lab.model_dir, lab.out, ["calibration.samples_per_class=8"])
    # routed slots: completion counts a fraction of the positions prompt+answer counts
    assert 0 < float(lab.profile["count"].sum()) < 0.5 * float(full["count"].sum())


def test_merge_joins_budgets_of_a_counts_file_and_refuses_overlapping_parts(tmp_path):
    counts = str(REPO / "docs" / "budget_curve.json")
    args = argparse.Namespace(out=str(tmp_path / "m"), json=str(tmp_path / "m.json"), png=str(tmp_path / "m.png"))
    bc.merge([f"{counts}:8", f"{counts}:4+3"], args)
    merged = bc.artifacts.read_json(tmp_path / "m.json")
    assert sorted(merged["budgets"], key=int) == ["3", "4", "8"]
    assert (tmp_path / "m" / "tables.md").is_file() and (tmp_path / "m.png").is_file()
    with pytest.raises(SystemExit, match="not disjoint budgets"):
        bc.merge([f"{counts}:8", f"{counts}:3", f"{counts}:3+4"], args)  # overlap between the 2nd and 3rd
    with pytest.raises(SystemExit, match="has no budget 9: expected one of"):
        bc.merge([f"{counts}:8+9"], args)  # a typo keeps nothing silently
