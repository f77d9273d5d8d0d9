"""The whole pipeline through the real CLI on a tiny random Gemma 4 checkpoint: caching, surgery
exactness, and bad input that must fail clearly without writing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SMALL = ["calibration.samples_per_class=4", "bench.n_per_class=2", "backend.batch_size=16"]


def moeprune(args, cache: Path, run_dir: Path, check=True):
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "moeprune", f"hydra.run.dir={run_dir}", *args],
                          capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"moeprune failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def stage_dirs(run_dir: Path) -> dict[str, Path]:
    return {k: Path(v["artifact"]) for k, v in json.loads((run_dir / "run.json").read_text())["stages"].items()}


def cached(run_dir: Path) -> dict[str, bool]:
    return {k: v["cached"] for k, v in json.loads((run_dir / "run.json").read_text())["stages"].items()}


def test_end_to_end_then_cache_hit_and_partial_miss(tiny_gemma4, tmp_path):
    cache = tmp_path / "cache"
    args = [f"model.path={tiny_gemma4}", *SMALL]
    out = moeprune(args, cache, tmp_path / "run1")
    assert "experts/layer" in out.stdout and "generic_code" in out.stdout
    assert not any(cached(tmp_path / "run1").values())

    moeprune(args, cache, tmp_path / "run2")
    assert all(cached(tmp_path / "run2").values())

    moeprune([*args, "strategy.alpha=0.5"], cache, tmp_path / "run3")
    c = cached(tmp_path / "run3")
    assert c["profile"] and c["evaluate_base"], "a recipe knob must not invalidate the profile or the base eval"
    assert not c["dropmap"]

    dirs = stage_dirs(tmp_path / "run1")
    manifest = json.loads((dirs["dropmap"] / "manifest.json").read_text())
    assert manifest["config"]["strategy"]["alpha"] == 2.0 and manifest["inputs"]["profile"]
    assert (tmp_path / "run1" / "prune").is_symlink()


def test_pruned_checkpoint_slices_experts_by_index(tiny_gemma4, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    moeprune([f"model.path={tiny_gemma4}", *SMALL, "keep.experts_per_layer=6", "stages.evaluate=false"],
             tmp_path / "cache", run)
    dirs = stage_dirs(run)
    drop = {int(k): v for k, v in json.loads((dirs["dropmap"] / "drop_map.json").read_text()).items()}
    pruned_dir = dirs["prune"] / "model"
    meta = json.loads((pruned_dir / "expert_drop_metadata.json").read_text())
    src, dst = load_file(str(tiny_gemma4 / "model.safetensors")), load_file(str(pruned_dir / "model.safetensors"))
    for layer, dropped in drop.items():
        assert len(dropped) == 2
        keep = [e for e in range(8) if e not in dropped]
        assert meta["keep"][str(layer)] == keep
        for name in ("experts.gate_up_proj", "experts.down_proj", "router.proj.weight", "router.per_expert_scale"):
            key = f"model.layers.{layer}.{name}"
            assert dst[key].shape[0] == 6
            for new_id, old_id in enumerate(keep):
                assert torch.equal(dst[key][new_id], src[key][old_id])
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert model.config.num_experts == 6 and model.model.layers[0].experts.gate_up_proj.shape[0] == 6


def test_dropping_nothing_reproduces_base_logits_exactly(tiny_gemma4, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    moeprune([f"model.path={tiny_gemma4}", *SMALL, "keep.drop_fraction=0", "stages.evaluate=false"],
             tmp_path / "cache", run)
    pruned = AutoModelForCausalLM.from_pretrained(stage_dirs(run)["prune"] / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma4).eval()
    x = torch.randint(3, 300, (3, 17))
    with torch.no_grad():
        assert torch.equal(base(x).logits, pruned(x).logits)


@pytest.mark.parametrize("override, message", [
    ("keep.experts_per_layer=99", "cannot keep 99 experts per layer"),
    ("keep.experts_per_layer=1", "top_k (2)"),
    ("model.path=/no/such/model", "model not found"),
    ("+class_weights.weights.no_such_class=2", "unknown classes ['no_such_class']"),
    ("strategy.normalize=foo", "strategy.normalize=foo: Invalid value 'foo', expected one of [rank, mean, none]"),
    ("keep.mode=budget", "keeps different counts per layer, which a checkpoint cannot hold"),
    ("keep.baseline_map=/tmp", "keep.baseline_map=/tmp is a directory: expected a baseline drop map JSON"),
    ("calibration.classes.generic_math=[{kind: jsonl}]", "calibration.classes.generic_math[0]: kind jsonl needs a path"),
    ("prune.mtp_heads=drp", "prune.mtp_heads=drp: Invalid value 'drp', expected one of [keep, drop]"),
    ("strategy.seed=7", "strategy.seed=7: strategy=max has no knob 'seed'"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tiny_gemma4, tmp_path, override, message):
    cache = tmp_path / "cache"
    args = [f"model.path={tiny_gemma4}", *SMALL, "stages.evaluate=false", override]
    if override.startswith("model.path"):
        args = [a for a in args if not a.startswith("model.path=" + str(tiny_gemma4))]
    proc = moeprune(args, cache, tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not cache.exists() or not any(cache.glob("*/*")), "config mistakes stop the run before the profile"
    for stage in ("dropmap", "prune"):
        assert not (cache / stage).exists() or not any((cache / stage).iterdir())


def test_unreadable_bench_data_stops_the_run_before_any_stage(tiny_gemma4, tmp_path):
    cache = tmp_path / "cache"
    small = [a for a in SMALL if not a.startswith("bench.n_per_class")]  # humaneval has no classes
    args = [f"model.path={tiny_gemma4}", *small, "bench=humaneval", f"bench.data.path={tmp_path / 'missing.jsonl'}"]
    proc = moeprune(args, cache, tmp_path / "run", check=False)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert not cache.exists() or not any(cache.glob("*/*")), "no stage may run before the bench data is known good"

    moeprune([*args, "stage=dropmap"], cache, tmp_path / "run2")  # a run without evaluation does not care
