"""The dropmap stage on a real tiny Gemma 4 profile through the runner, and the recipe presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import moeprune.cli  # noqa: F401  (registers the schema and the moeprune_pkg resolver)
from moeprune.errors import MoePruneError
from moeprune.runner import Runner
from moeprune.stages import STAGES

RECIPES = Path(__file__).resolve().parents[1] / "conf" / "recipe"


def _compose(overrides=()):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random Gemma 4 (8 experts, top-2) and a cache holding its profile."""
    from conftest import save_tiny_gemma4

    root = tmp_path_factory.mktemp("dropmap_stage")
    model = save_tiny_gemma4(root / "model", layers=3)
    cache = root / "cache"
    run(model, cache, root / "warm", [])
    return model, cache, root


def run(model, cache, run_dir, overrides):
    cfg = _compose([f"model.path={model}", "calibration.samples_per_class=3", f"paths.output_dir={run_dir}",
                    f"paths.cache_dir={cache}", *overrides])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Runner(cfg, STAGES, run_dir).run("dropmap"), run_dir


def test_stage_writes_map_summary_and_heatmap(tiny_run):
    model, cache, root = tiny_run
    results, run_dir = run(model, cache, root / "a", ["recipe=toy_v7_coderx"])
    out = run_dir / "dropmap"
    drop = json.loads((out / "drop_map.json").read_text())
    assert list(drop) == ["0", "1", "2"] and all(len(v) == 2 for v in drop.values())  # 25% of 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["strategy"]["breadth_bonus"] == 0.5
    assert summary["recipe"]["class_weights"]["name"] == "toy_lcb_only"
    assert {v["floor"] for v in summary["layers"].values()} == {1, 2}  # [0.245, 0.408] x 6 kept -> [1, 2]
    assert (out / "keep_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert results["dropmap"]["keep_per_layer"] == 6 and results["dropmap"]["cached"] is False


def test_baseline_map_overlap_is_reported_and_hashed_into_the_key(tiny_run, tmp_path):
    model, cache, root = tiny_run
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"0": [0, 1], "1": [2, 3], "2": [4, 5]}))
    results, run_dir = run(model, cache, tmp_path / "r1", [f"keep.baseline_map={base}"])
    summary = json.loads((run_dir / "dropmap" / "summary.json").read_text())
    drop = json.loads((run_dir / "dropmap" / "drop_map.json").read_text())
    for layer, ids in drop.items():
        assert summary["layers"][layer]["overlap_with_baseline"] == len(set(ids) & set(json.loads(base.read_text())[layer]))
    assert results["dropmap"]["mean_overlap_with_baseline"] == summary["baseline"]["mean_overlap"]
    base.write_text(json.dumps({"0": [6, 7], "1": [6, 7], "2": [6, 7]}))  # same path, new content: rebuilt
    results, _ = run(model, cache, tmp_path / "r2", [f"keep.baseline_map={base}"])
    assert results["dropmap"]["cached"] is False


@pytest.mark.parametrize("overrides, message", [
    (["keep.baseline_map=BASE"], "duplicate expert ids [1]"),
    (["recipe=v6_coder"], "floor_clamp.profile=expert_neuron_v4: not found; expected a floor profile artifact dir "
                          "(pass floor_clamp.profile=PATH, or floor_clamp.profile=null to rank the floor by the run's "
                          "own profile)"),
    (["recipe=v6_coder", "floor_clamp.profile=null"], "floor_clamp.map=v4_layer_floor_map.json: not found; expected "
                                                      "a floor map JSON (pass floor_clamp.map=PATH, or "
                                                      "floor_clamp.map=null to run without it)"),
    (["recipe=v7_coder", "floor_clamp.map=null"], "floor_clamp.profile=expert_neuron_base_v7: not found"),
    # a group switched off after a recipe wins: the next missing file is the recipe's baseline map
    (["recipe=v6_coder", "floor_clamp=none"], "keep.baseline_map=teacher_force_98e_p16_clean.json: not found; "
                                              "expected a baseline drop map JSON (pass keep.baseline_map=PATH, or "
                                              "keep.baseline_map=null to run without it)"),
    (["recipe=v6_coder", "floor_clamp=none", "keep.baseline_map=null"], "cannot keep 98 experts per layer"),
    (["recipe=toy_v6_coder", "class_weights=lcb_only"], "unknown classes ['targeted_humaneval'"),
    (["keep.experts_per_layer=1"], "top_k (2)"),
])
def test_bad_recipe_input_fails_clearly_and_writes_no_artifact(tiny_run, tmp_path, overrides, message):
    model, cache, root = tiny_run
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"0": [1, 1], "1": [2, 3], "2": [4, 5]}))
    before = sorted((cache / "dropmap").iterdir()) if (cache / "dropmap").exists() else []
    with pytest.raises(MoePruneError) as e:
        run(model, cache, tmp_path / "run", [o.replace("BASE", str(base)) for o in overrides])
    assert message in str(e.value)
    after = sorted((cache / "dropmap").iterdir()) if (cache / "dropmap").exists() else []
    assert after == before, "a failed dropmap stage must leave nothing in the cache"


def test_own_profile_as_floor_profile(tiny_run, tmp_path):
    model, cache, root = tiny_run
    profile_dir = root / "warm" / "profile"
    results, run_dir = run(model, cache, tmp_path / "r", [f"floor_clamp.profile={profile_dir}", "floor_clamp.top=4",
                                                          "keep.experts_per_layer=5"])
    summary = json.loads((run_dir / "dropmap" / "summary.json").read_text())
    assert all(v["floor"] == 4 and v["protected_by"]["floor"] == 4 for v in summary["layers"].values())


# ---- recipe presets ------------------------------------------------------------------------------
def test_every_recipe_composes_and_names_only_real_presets():
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert {"v3_pooled", "v4", "v5_coder", "v6_coder", "v7_coder", "v7_coderx", "toy_v3_pooled", "toy_v4",
            "toy_v6_coder", "toy_v7_coderx", "toy_coder"} <= set(names)
    for name in names:
        cfg = _compose([f"recipe={name}"])
        assert cfg.strategy.name and cfg.class_weights.name and cfg.floor_clamp.name


def test_published_recipes_reproduce_the_cards_knobs():
    v6 = _compose(["recipe=v6_coder"])
    s = v6.strategy
    assert (s.name, s.normalize, s.alpha, s.breadth_bonus, s.protect_top) == ("max", "rank", 2.0, 0.5, 16)
    assert (s.outlier_mode, s.outlier_threshold) == ("median", 1e4)
    order = ["generic_math", "generic_logic", "generic_code", "generic_science", "generic_creative",
             "targeted_humaneval", "targeted_humanevalplus", "targeted_lcb_medium_55"]
    assert [v6.class_weights.weights[c] for c in order] == [1, 1, 3, 1, 1, 0, 0, 2]  # --class-weights 1 1 3 1 1 0 0 2
    assert v6.keep.experts_per_layer == 98 and v6.prune.shared_ffn_alpha == 1.2 and v6.floor_clamp.name == "v4_floor_map"

    v7, v7x = _compose(["recipe=v7_coder"]), _compose(["recipe=v7_coderx"])
    assert list(v7.floor_clamp.band) == [24, 40] and list(v7x.floor_clamp.band) == [24, 40]
    assert v7.class_weights.weights.targeted_gpqa == 1.5 and v7x.class_weights.weights.targeted_gpqa == 0
    assert {k: v for k, v in v7.class_weights.weights.items() if k != "targeted_gpqa"} == \
           {k: v for k, v in v7x.class_weights.weights.items() if k != "targeted_gpqa"}
    assert v7.class_weights.weights.generic_multilingual == 0

    v4 = _compose(["recipe=v4"])
    assert (v4.strategy.name, v4.strategy.normalize, v4.strategy.protect_top) == ("max", "mean", 16)
    assert sorted(v4.class_weights.weights) == ["generic_code", "generic_creative", "generic_logic", "generic_math",
                                                "generic_science"] and v4.class_weights.default == 0
    v3 = _compose(["recipe=v3_pooled"])
    assert (v3.strategy.name, v3.strategy.normalize, v3.class_weights.name) == ("sum", "none", "uniform")


def test_one_knob_overrides_a_recipe():
    cfg = _compose(["recipe=toy_v7_coderx", "strategy.breadth_bonus=0.25", "floor_clamp=band_15_25"])
    assert cfg.strategy.breadth_bonus == 0.25 and list(cfg.floor_clamp.band) == [15, 25]
    assert cfg.class_weights.name == "toy_lcb_only"


def test_a_reference_map_is_used_as_is_and_scored(tiny_run, tmp_path):
    model, cache, root = tiny_run
    ref = tmp_path / "reference_drop_map.json"
    ref.write_text(json.dumps({"0": [0, 7], "1": [1, 6], "2": [2, 5]}))  # the reference tools' schema
    results, run_dir = run(model, cache, tmp_path / "r", [f"keep.drop_map={ref}", "keep.experts_per_layer=99"])
    out = run_dir / "dropmap"
    assert json.loads((out / "drop_map.json").read_text()) == json.loads(ref.read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["imported_from"] == str(ref) and summary["keep_per_layer"] == 6
    ref.write_text(json.dumps({"0": [0, 7], "1": [1], "2": [2, 5]}))  # uneven: a checkpoint cannot hold it
    with pytest.raises(MoePruneError, match="different expert counts per layer"):
        run(model, cache, tmp_path / "r2", [f"keep.drop_map={ref}"])


@pytest.mark.parametrize("baseline", ["reap", "frequency", "gate_mass"])
@pytest.mark.parametrize("weights", ["uniform", "coder"])
def test_the_recipe_with_a_baselines_score_writes_that_baselines_map_from_a_real_profile(tiny_run, baseline, weights):
    model, cache, root = tiny_run
    common = ["keep.drop_fraction=0.5", f"class_weights={weights}"]
    _, want = run(model, cache, root / f"{baseline}-{weights}", [f"strategy={baseline}", *common])
    _, got = run(model, cache, root / f"sum-{baseline}-{weights}",
                 ["strategy=sum", f"strategy.score={baseline}", "strategy.normalize=none", *common])
    read = lambda d: json.loads((d / "dropmap" / "drop_map.json").read_text())  # noqa: E731
    assert read(got) == read(want) and all(len(v) == 4 for v in read(want).values())


def test_a_profile_the_profile_stage_wrote_builds_the_same_map_with_no_model_dir(tiny_run):
    """Profile on the machine with the model, derive maps elsewhere: the artifact records top_k."""
    model, cache, root = tiny_run
    results, run_dir = run(model, cache, root / "with_model", ["recipe=toy_v7_coderx"])
    artifact = run_dir / "profile"
    assert json.loads((artifact / "profile.json").read_text())["top_k"] == 2
    cfg = _compose(["recipe=toy_v7_coderx", f"profile.path={artifact}", "model.path=/no/model/here",
                    f"paths.output_dir={root / 'no_model'}", f"paths.cache_dir={root / 'other_cache'}"])
    (root / "no_model").mkdir()
    Runner(cfg, STAGES, root / "no_model").run("dropmap")
    maps = [json.loads((d / "dropmap" / "drop_map.json").read_text()) for d in (run_dir, root / "no_model")]
    assert maps[0] == maps[1]


def test_an_unreadable_recorded_model_config_stops_the_run_before_any_stage(tiny_run, tmp_path):
    import shutil

    model, cache, root = tiny_run
    _, run_dir = run(model, cache, root / "for_a_copy", ["recipe=toy_v7_coderx"])
    broken = tmp_path / "profile"
    shutil.copytree(run_dir / "profile", broken)
    (broken / "model_config.json").write_text("{ not json")
    cfg = _compose(["recipe=toy_v7_coderx", f"profile.path={broken}", "model.path=/no/model/here",
                    f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(MoePruneError, match=r"model_config.json is not a config.json .*expected the model's config"):
        Runner(cfg, STAGES, tmp_path / "run").run("dropmap")
    assert not (tmp_path / "cache").exists()
