"""A published recipe re-derives the reference's map from the reference's own files alone: profile
JSON (imported), floor profile JSON (imported), floor map, baseline map; no model on disk.

The expected map comes from `reference_map` below, a direct transcription of the reference recipe
as specified (steps 1-8 of the drop-map spec, numpy's stable sorts), independent of moeprune's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from moeprune.prune import recipe as dropmap
from moeprune.profile import Profile

V7_CLASSES = {"generic_math": 1, "generic_logic": 1, "generic_code": 3, "generic_science": 1, "generic_creative": 1,
              "generic_multilingual": 0, "targeted_humaneval": 0, "targeted_humanevalplus": 0,
              "targeted_lcb_medium_55": 2, "targeted_gpqa": 0}
V4_CLASSES = ["math", "logic", "code", "science", "creative"]
L, E = 3, 128


def fake_stats(rng, classes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class (wnorm, tc) [L, E]: about 40% of experts never routed (0, 0), as in a real profile
    where every class leaves many experts idle; a few bf16-style wnorm outliers and one NaN."""
    out = {}
    for c in classes:
        tc = rng.integers(1, 60, (L, E)).astype(float)
        tc[rng.random((L, E)) < 0.4] = 0
        wnorm = np.where(tc > 0, tc * rng.gamma(2.0, 0.5, (L, E)), 0.0)
        wnorm[rng.random((L, E)) < 0.01] = 3.9e18
        out[c] = (wnorm, tc)
    out[classes[0]][0][1, 5] = float("nan")
    return out


def reference_json(stats) -> dict:
    """The layout the reference's profiler writes (rows by id, counts as ints, extra fields ignored)."""
    return {"metadata": {"num_layers": L, "num_experts": E, "categories": list(stats), "intermediate_size": 704},
            "categories": {c: {str(l): [{"id": e, "wnorm": float(w[l, e]), "rnorm": 0.0, "wnsq": 0.0, "wsum": 0.0,
                                         "tc": int(t[l, e]), "cc": 1} for e in range(E)] for l in range(L)}
                           for c, (w, t) in stats.items()}}


def reference_map(stats, weights, floor_stats, floor_counts, keep=98, protect_top=16, alpha=2.0, bonus=0.5,
                  thresh=1e4) -> dict[str, list[int]]:
    def score(wnorm, tc):  # alpha*wnorm + tc, outliers per (class, layer) row -> the median of the clean cells
        s = alpha * wnorm + tc
        for l in range(L):
            bad = ~np.isfinite(s[l]) | ~np.isfinite(wnorm[l]) | (np.abs(wnorm[l]) > thresh)
            s[l][bad] = np.median(s[l][~bad]) if (~bad).any() else 0.0
        return s

    def stable_rank(row):
        r = np.empty(E)
        r[np.argsort(row, kind="stable")] = np.arange(E)
        return r / (E - 1)

    s = np.stack([score(*stats[c]) for c in stats])
    norm = np.stack([[stable_rank(s[c, l]) for l in range(L)] for c in range(len(stats))])
    w = np.array([weights[c] for c in stats], dtype=float)
    agg = (w[:, None, None] * norm).max(axis=0) + bonus * norm.mean(axis=0)
    floor = np.stack([score(*floor_stats[c]) for c in floor_stats]).max(axis=0)
    out = {}
    for l in range(L):
        protected = set(np.argsort(-agg[l], kind="stable")[:protect_top].tolist())
        protected |= set(np.argsort(-floor[l], kind="stable")[:floor_counts[l]].tolist())
        if len(protected) > keep:
            protected = set(sorted(sorted(protected), key=lambda e: -floor[l, e])[:keep])
        order = [e for e in np.argsort(agg[l], kind="stable").tolist() if e not in protected]
        out[str(l)] = sorted(order[:E - keep])
    return out


def test_v7_coderx_rederives_the_reference_map_from_its_json_files_without_a_model(tmp_path):
    rng = np.random.default_rng(7)
    main, floor_data = fake_stats(rng, list(V7_CLASSES)), fake_stats(rng, V4_CLASSES)
    (tmp_path / "expert_neuron_v7_code_gpqa.json").write_text(json.dumps(reference_json(main)))
    (tmp_path / "expert_neuron_base_v7.json").write_text(json.dumps(reference_json(floor_data)))
    # the floor map's per-layer signal 10, 20, 15 rescales into [24, 40] as 24, 40, 32
    (tmp_path / "v4_layer_floor_map_v7.json").write_text(json.dumps({
        "floor_per_layer": {"0": 95, "1": 95, "2": 95}, "top98_mean_per_layer": {"0": 10.0, "1": 20.0, "2": 15.0}}))
    (tmp_path / "teacher_force.json").write_text(json.dumps({str(l): list(range(30)) for l in range(L)}))
    env = {**os.environ, "MOEPRUNE_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"}

    def sh(*args):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    sh("moeprune.prune.profile", "import", "--top-k", "8", "expert_neuron_v7_code_gpqa.json", "profile_v7")
    sh("moeprune.prune.profile", "import", "expert_neuron_base_v7.json", "expert_neuron_base_v7")
    sh("moeprune", "stage=dropmap", "recipe=v7_coderx", "profile.path=profile_v7", "model.path=/no/model/here",
       "floor_clamp.map=v4_layer_floor_map_v7.json", "keep.baseline_map=teacher_force.json", "hydra.run.dir=run")
    got = json.loads((tmp_path / "run" / "dropmap" / "drop_map.json").read_text())
    expected = reference_map(main, V7_CLASSES, floor_data, [24, 40, 32])
    assert got == expected
    summary = json.loads((tmp_path / "run" / "dropmap" / "summary.json").read_text())
    assert [v["floor"] for v in summary["layers"].values()] == [24, 40, 32]
    assert summary["outliers"]["treated"] > 0 and summary["baseline"]["mean_overlap"] is not None

    # the shared-lowest rule on the same files gives another map: the ties decide real experts here
    from test_dropmap_stage import _compose

    cfg = _compose(["recipe=v7_coderx", f"floor_clamp.profile={tmp_path / 'expert_neuron_base_v7'}",
                    f"floor_clamp.map={tmp_path / 'v4_layer_floor_map_v7.json'}", "keep.baseline_map=null"])
    profile = Profile.load(tmp_path / "profile_v7")
    def recipe():
        return dropmap.Recipe.of(cfg.strategy, cfg.class_weights, cfg.floor_clamp, cfg.keep)

    assert dropmap.build(profile, recipe(), 8).as_json() == expected
    cfg.strategy.rank_ties = "min"
    assert dropmap.build(profile, recipe(), 8).as_json() != expected


def test_a_given_profile_without_top_k_or_a_missing_one_stops_before_any_stage(tmp_path):
    import pytest

    from moeprune.errors import MoePruneError
    from moeprune.prune.profile.reference_json import import_reference
    from moeprune.runner import Runner
    from moeprune.stages import STAGES
    from test_dropmap_stage import _compose

    (tmp_path / "p.json").write_text(json.dumps(reference_json(fake_stats(np.random.default_rng(0), list(V7_CLASSES)))))
    import_reference(tmp_path / "p.json", tmp_path / "prof")  # no --top-k
    base = ["recipe=v7_coderx", "floor_clamp=none", "keep.baseline_map=null", "model.path=/no/model",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    for given, message in ((tmp_path / "prof", r"records no top_k.*import --top-k K"),
                           (tmp_path / "nope", r"profile.path=.*nope: .*not a readable profile.*profile import")):
        with pytest.raises(MoePruneError, match=message):
            Runner(_compose([*base, f"profile.path={given}"]), STAGES, tmp_path).run("dropmap")
    assert not (tmp_path / "cache").exists()


def test_a_given_profile_headed_for_surgery_is_checked_against_the_model_before_any_stage(tiny_gemma4, tmp_path):
    import pytest

    from moeprune.errors import MoePruneError
    from moeprune.prune.profile.reference_json import import_reference
    from moeprune.runner import Runner
    from moeprune.stages import STAGES
    from test_dropmap_stage import _compose

    (tmp_path / "p.json").write_text(json.dumps(reference_json(fake_stats(np.random.default_rng(0), list(V7_CLASSES)))))
    import_reference(tmp_path / "p.json", tmp_path / "prof", top_k=8)
    cfg = _compose(["recipe=v7_coderx", "floor_clamp=none", "keep.baseline_map=null", f"model.path={tiny_gemma4}",
                    f"profile.path={tmp_path / 'prof'}", f"paths.output_dir={tmp_path}",
                    f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(MoePruneError, match=r"has 128 experts per layer, the model .* 8: expected the profile"):
        Runner(cfg, STAGES, tmp_path).run("prune")
    assert not (tmp_path / "cache").exists()
