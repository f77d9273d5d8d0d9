"""logger=wandb writes an offline W&B run we read back; logger=none needs no wandb at all."""

from __future__ import annotations

import json

import pytest

from moeprune.tracking import flat_metrics
from sweep_support import SMALL, moeprune, trial_records, wandb_run


def test_flat_metrics():
    results = {"dropmap": {"cached": True, "keep_per_layer": 6, "classes": ["a"]},
               "evaluate_base": {"bench": "toy_suite", "score": 0.5, "per_category": {"a": 1.0, "b": 0.0}},
               "evaluate": {"bench": "toy_suite", "score": 0.25, "per_category": {"a": 0.5, "b": 0.0}}}
    assert flat_metrics(results) == {"dropmap/cached": 1.0, "dropmap/keep_per_layer": 6.0,
                                     "evaluate_base/score": 0.5, "evaluate_base/per_category/a": 1.0,
                                     "evaluate_base/per_category/b": 0.0, "evaluate/score": 0.25,
                                     "evaluate/per_category/a": 0.5, "evaluate/per_category/b": 0.0}


def test_wandb_offline_run_holds_config_metrics_heatmap_table_and_artifacts(study):
    """Trial 0 of the shared study (the default recipe) read back from its offline run."""
    rec = trial_records(study["root"] / "sweep")[0]
    run_dir = rec["dir"]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    run = wandb_run(offline)
    stages = json.loads((run_dir / "run.json").read_text())["stages"]

    assert run["name"] == "toy_recipe-trial0" and run["group"] == "toy_recipe"
    assert run["config"]["strategy"]["alpha"] == 2.0 and run["config"]["bench"]["n_per_class"] == 2
    assert run["config"]["paths"]["output_dir"] == str(run_dir)  # resolved, not ${hydra:...}
    h = run["history"]
    assert h["evaluate/score"] == stages["evaluate"]["score"] == h["objective/0"] == rec["values"][0]
    assert h["dropmap/wall_time_s"] == stages["dropmap"]["wall_time_s"] and h["profile/cached"] == float(stages["profile"]["cached"])
    for cls, value in stages["evaluate"]["per_category"].items():
        assert h[f"evaluate/per_category/{cls}"] == value

    assert h["dropmap/keep_heatmap/_type"] == "image-file"
    png = offline / "files" / h["dropmap/keep_heatmap/path"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((offline / "files" / h["per_class/path"]).read_text())
    assert table["columns"] == ["bench", "class", "base", "pruned", "delta"]
    assert [r[1] for r in table["data"]] == [*stages["evaluate"]["per_category"], "ALL"]
    assert table["data"][-1][2] == stages["evaluate_base"]["score"]

    arts = dict(run["artifacts"])
    assert {"drop_map.json", "summary.json", "manifest.json"} <= set(arts["dropmap"])
    assert {"summary.json", "samples.jsonl"} <= set(arts["evaluate"])
    assert not any(name.endswith(".safetensors") for files in arts.values() for name in files)


def test_a_plain_run_is_named_by_its_dir_and_has_no_group(sweep_model, sweep_cache, tmp_path):
    run_dir = tmp_path / "myrun"
    moeprune([f"model.path={sweep_model}", *SMALL, "stages.evaluate=false", "logger=wandb",
              "strategy.alpha=1.5", f"hydra.run.dir={run_dir}"], tmp_path, sweep_cache)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    run = wandb_run(offline)
    assert run["name"] == "myrun" and run["group"] == "" and run["config"]["strategy"]["alpha"] == 1.5
    assert "objective/0" not in run["history"] and "dropmap/keep_per_layer" in run["history"]


@pytest.fixture
def no_wandb(tmp_path) -> dict:
    """PYTHONPATH with a `wandb` that cannot be imported, as on a machine without it."""
    stub = tmp_path / "stub" / "wandb"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named wandb (test stub)')\n")
    return {"PYTHONPATH": str(stub.parent)}


def test_logger_none_runs_without_wandb_and_logger_wandb_says_what_is_missing(sweep_model, sweep_cache, tmp_path,
                                                                               no_wandb):
    args = [f"model.path={sweep_model}", *SMALL, "stages.evaluate=false"]
    moeprune([*args, "logger=none", f"hydra.run.dir={tmp_path}/a"], tmp_path, sweep_cache, no_wandb)
    assert (tmp_path / "a" / "run.json").exists() and not (tmp_path / "a" / "wandb").exists()

    proc = moeprune([*args, "logger=wandb", f"hydra.run.dir={tmp_path}/b"], tmp_path, sweep_cache, no_wandb, check=False)
    assert proc.returncode == 2
    assert "logger=wandb needs the wandb package" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_logger_mode_fails_before_anything_is_logged(sweep_model, sweep_cache, tmp_path):
    proc = moeprune([f"model.path={sweep_model}", *SMALL, "stages.evaluate=false", "logger=wandb",
                     "logger.mode=onlin", f"hydra.run.dir={tmp_path}/r"], tmp_path, sweep_cache, check=False)
    assert proc.returncode == 2 and "logger.mode=onlin: Invalid value 'onlin', expected one of [offline, online, disabled]" \
        in proc.stderr
    assert not (tmp_path / "r" / "run.json").exists(), "the logger is checked before the pipeline runs"
