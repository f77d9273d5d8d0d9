"""The evaluate stages through the real CLI on a tiny random Gemma 4: virtual pruning scores a drop
map exactly like the pruned checkpoint, `evaluate.validate=true` checks a bench's scorer, and
`moeprune compare` reports per-bench deltas and the per-problem agreement matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moeprune.evaluate.bench_run import read_jsonl

SMALL = ["calibration.samples_per_class=4", "bench.n_per_class=3", "backend.batch_size=32", "keep.experts_per_layer=6"]
FIX = Path(__file__).resolve().parent / "fixtures"


def moeprune(args, cache: Path, run_dir: Path | None = None):
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    extra = [f"hydra.run.dir={run_dir}"] if run_dir else []
    return subprocess.run([sys.executable, "-m", "moeprune", *extra, *args], capture_output=True, text=True, env=env)


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["stages"]


def test_virtual_pruning_scores_like_the_pruned_checkpoint_and_compare_agrees(tiny_gemma4, tmp_path):
    cache = tmp_path / "cache"
    phys = moeprune([f"model.path={tiny_gemma4}", *SMALL], cache, tmp_path / "physical")
    assert phys.returncode == 0, phys.stderr
    virt = moeprune([f"model.path={tiny_gemma4}", *SMALL, "evaluate.virtual=true", "stages.evaluate_base=false"],
                    cache, tmp_path / "virtual")
    assert virt.returncode == 0, virt.stderr

    ran = stages(tmp_path / "virtual")
    assert "prune" not in ran and ran["dropmap"]["cached"] and not ran["evaluate"]["cached"]
    assert ran["evaluate"]["num_experts"] == 6 and ran["evaluate"]["size_bytes"] is None
    a = read_jsonl(Path(stages(tmp_path / "physical")["evaluate"]["artifact"]) / "samples.jsonl")
    b = read_jsonl(Path(ran["evaluate"]["artifact"]) / "samples.jsonl")
    assert [r["completion"] for r in a] == [r["completion"] for r in b]  # same greedy tokens, every prompt

    # One run dir: its base vs its pruned model.
    one = subprocess.run([sys.executable, "-m", "moeprune", "compare", str(tmp_path / "physical"),
                          "--json", str(tmp_path / "cmp.json")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    result = json.loads((tmp_path / "cmp.json").read_text())["benches"]["toy_suite"]
    m = result["agreement"]
    assert m["common"] == 18 and m["both_right"] + m["both_wrong"] + m["only_a"] + m["only_b"] == 18
    assert result["settings_drift"] == {} and "toy_suite" in one.stdout and "both right" in one.stdout

    # Physical vs virtual: the same answers, so full agreement and a zero delta.
    from moeprune.evaluate.compare import compare

    r2 = compare(str(tmp_path / "physical"), str(tmp_path / "virtual"))["benches"]["toy_suite"]
    assert r2["delta"] == 0 and r2["agreement"]["only_a"] == r2["agreement"]["only_b"] == 0


def test_compare_reports_settings_drift_and_bad_paths(tiny_gemma4, tmp_path, capsys):
    from moeprune.evaluate.backends.hf import HFBackend
    from moeprune.evaluate.benches.toy_suite import ToySuite
    from moeprune.evaluate.compare import main as compare_main
    from moeprune.evaluate.bench_run import run_bench

    backend = HFBackend(tiny_gemma4, device="cpu")
    run_bench(ToySuite(n_per_class=2), backend, tmp_path / "a")
    run_bench(ToySuite(n_per_class=2, max_new_tokens=4), backend, tmp_path / "b")
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "WARNING toy_suite: settings differ" in out and "max_new_tokens" in out
    assert compare_main([str(tmp_path / "nope"), str(tmp_path / "a")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_validate_checks_the_scorer_and_fails_loudly_on_a_broken_one(tmp_path):
    ok = moeprune(["evaluate.validate=true", "bench=humaneval", "bench.n=5"], tmp_path / "cache", tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    report = json.loads((Path(stages(tmp_path / "ok")["validate"]["artifact"]) / "validation.json").read_text())
    assert report["canonical"] == {"n": 5, "passed": 5, "score": 1.0, "failures": []}
    assert report["empty"]["score"] == 0.0

    # A dataset whose reference solution is wrong: validation must fail and name the problem.
    row = json.loads((FIX / "humanevalplus.jsonl").read_text().splitlines()[1])
    row["canonical_solution"] = "    return x - y\n"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(row) + "\n")
    bad = moeprune(["evaluate.validate=true", "bench=humanevalplus", f"bench.data.path={broken}"], tmp_path / "cache",
                   tmp_path / "bad")
    assert bad.returncode == 2
    assert "scorer validation failed: 1/1 canonical solutions fail" in bad.stderr and "HumanEval/53" in bad.stderr


def test_virtual_needs_the_hf_backend(tiny_gemma4, tmp_path):
    small = [a for a in SMALL if not a.startswith("backend.batch_size")]  # an hf knob
    out = moeprune([f"model.path={tiny_gemma4}", *small, "evaluate.virtual=true", "stages.evaluate_base=false",
                    "backend=openai", "backend.base_url=http://127.0.0.1:9/v1"], tmp_path / "cache", tmp_path / "run")
    assert out.returncode == 2 and "evaluate.virtual=true" in out.stderr and "expected backend=hf" in out.stderr


def test_virtual_applies_the_shared_ffn_upweight_and_answers_as_the_upweighted_checkpoint(tiny_gemma4, tmp_path):
    cache, up = tmp_path / "cache", "prune.shared_ffn_alpha=1.2"
    phys = moeprune([f"model.path={tiny_gemma4}", *SMALL, up], cache, tmp_path / "physical")
    assert phys.returncode == 0, phys.stderr
    virt = moeprune([f"model.path={tiny_gemma4}", *SMALL, up, "evaluate.virtual=true", "stages.evaluate_base=false"],
                    cache, tmp_path / "virtual")
    assert virt.returncode == 0, virt.stderr
    plain = moeprune([f"model.path={tiny_gemma4}", *SMALL, "evaluate.virtual=true", "stages.evaluate_base=false"],
                     cache, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    a = read_jsonl(Path(stages(tmp_path / "physical")["evaluate"]["artifact"]) / "samples.jsonl")
    b = read_jsonl(Path(stages(tmp_path / "virtual")["evaluate"]["artifact"]) / "samples.jsonl")
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    # alpha is in the virtual evaluate's key: the unscaled trial is its own artifact, not a cache hit
    assert stages(tmp_path / "plain")["evaluate"]["artifact"] != stages(tmp_path / "virtual")["evaluate"]["artifact"]


def test_a_backend_target_that_is_not_a_backend_is_refused_by_name(tiny_gemma4, tmp_path, monkeypatch):
    import pytest
    from hydra import compose, initialize_config_module

    import moeprune.cli  # noqa: F401  (registers the schema)
    from moeprune.errors import MoePruneError
    from moeprune.runner import StageContext
    from moeprune.stages import run_evaluate_base

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"model.path={tiny_gemma4}", "backend._target_=builtins.dict"])
    with pytest.raises(MoePruneError, match=r"backend=hf: builtins.dict builds a dict, expected a Backend"):
        run_evaluate_base(StageContext(cfg, tmp_path / "out", {}))


def test_others_mean_is_each_class_against_the_unweighted_mean_of_the_rest():
    import pytest

    from moeprune.evaluate.bench_run import others_mean

    got = others_mean({"code": 0.9, "math": 0.6, "science": 0.3})
    assert got == pytest.approx({"code": 0.45, "math": 0.6, "science": 0.75})
    assert others_mean({"code": 0.9}) == {} and others_mean({}) == {}  # no other class to average
