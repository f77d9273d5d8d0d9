"""The objective without generation (bench=divergence): the base model scores zero divergence and full
agreement against its own continuations, divergence grows as fewer experts are kept, the base side is
built once and reused, memory is bounded by cutting batches, and the held-out prompts leave out what
the calibration corpus profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeprune.evaluate import teacher_forced
from moeprune.evaluate.backends import hf
from moeprune.evaluate.backends.hf import HFBackend
from moeprune.evaluate.benches.divergence import Divergence
from moeprune.dropmap import DropMap, VirtualPrune

TOY = Path(__file__).resolve().parents[1] / "moeprune" / "toy" / "model"
SMALL = ["calibration.samples_per_class=8", "bench.n_per_class=6", "backend.batch_size=32"]


def moeprune(args, cache: Path, run_dir: Path):
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "moeprune", f"hydra.run.dir={run_dir}", *args],
                          capture_output=True, text=True, env=env)


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["stages"]


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return HFBackend(TOY, batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    bench = Divergence(texts="toy", split="val", n_per_class=10, chat=False, max_new_tokens=16, top_logprobs=384)
    out = tmp_path_factory.mktemp("reference")
    teacher_forced.build_reference(bench, toy, out)
    return bench, out


def score_with(toy, bench, ref, drop_map=None):
    toy.virtual = VirtualPrune(drop_map)
    try:
        return teacher_forced.score(bench, toy, ref)[0]
    finally:
        toy.virtual = VirtualPrune()


def test_the_unpruned_model_has_zero_divergence_and_full_agreement(toy, reference):
    bench, ref = reference
    summary = score_with(toy, bench, ref)
    assert summary["metrics"]["kl"]["score"] == pytest.approx(0.0, abs=1e-6)
    assert summary["metrics"]["agreement"]["score"] == 1.0
    assert set(summary["per_category"]) == set(bench.classes) and summary["n"] == 60


def test_divergence_grows_as_fewer_experts_are_kept_on_average_over_recipes(toy, reference):
    bench, ref = reference
    layers = range(4)

    def mean_kl(keep: int) -> float:
        kls = []
        for seed in range(3):  # three random maps per keep count: the growth is on average, not per map
            g = torch.Generator().manual_seed(seed)
            dropped = {layer: sorted(torch.randperm(16, generator=g)[: 16 - keep].tolist()) for layer in layers}
            drop_map = DropMap.parse({str(k): v for k, v in dropped.items()}, num_experts=16, top_k=2)
            kls.append(score_with(toy, bench, ref, drop_map)["metrics"]["kl"]["score"])
        return sum(kls) / len(kls)

    kl12, kl8, kl4 = mean_kl(12), mean_kl(8), mean_kl(4)
    assert 0 < kl12 < kl8 < kl4


def test_cutting_batches_to_bound_memory_gives_the_same_scores(toy, reference, monkeypatch):
    bench, ref = reference
    drop_map = DropMap.parse({str(layer): [0, 1, 2, 3, 4, 5] for layer in range(4)}, num_experts=16, top_k=2)
    whole = score_with(toy, bench, ref, drop_map)
    monkeypatch.setattr(hf, "TEACHER_LOGITS", 384 * 16 * 3)  # three rows per forward at most
    cut = score_with(toy, bench, ref, drop_map)
    for m in ("kl", "nll", "agreement"):
        assert cut["metrics"][m]["score"] == pytest.approx(whole["metrics"][m]["score"], rel=1e-4, abs=1e-6)


def test_a_kl_over_fewer_kept_entries_is_a_lower_bound(toy, reference, tmp_path):
    bench, ref = reference
    coarse = Divergence(texts="toy", split="val", n_per_class=10, chat=False, max_new_tokens=16, top_logprobs=4)
    teacher_forced.build_reference(coarse, toy, tmp_path)
    drop_map = DropMap.parse({str(layer): list(range(8)) for layer in range(4)}, num_experts=16, top_k=2)
    exact = score_with(toy, bench, ref, drop_map)["metrics"]
    bound = score_with(toy, coarse, tmp_path, drop_map)["metrics"]
    assert 0 < bound["kl"]["score"] <= exact["kl"]["score"] + 1e-6
    assert bound["nll"] == exact["nll"] and bound["agreement"] == exact["agreement"]  # these need no base entries


def test_the_cli_objective_is_built_once_and_its_base_side_reused(tmp_path):
    cache = tmp_path / "cache"
    first = moeprune(["bench=divergence", "evaluate.virtual=true", "keep.experts_per_layer=8", *SMALL], cache,
                     tmp_path / "a")
    assert first.returncode == 0, first.stderr
    ran = stages(tmp_path / "a")
    assert not ran["reference"]["cached"] and ran["evaluate_base"]["score"] == pytest.approx(0.0, abs=1e-6)
    assert ran["evaluate"]["metric"] == "kl" and ran["evaluate"]["score"] > 0
    assert "class (kl)" in first.stdout
    second = moeprune(["bench=divergence", "evaluate.virtual=true", "keep.experts_per_layer=6", "strategy=reap",
                       *SMALL], cache, tmp_path / "b")
    assert second.returncode == 0, second.stderr
    again = stages(tmp_path / "b")
    assert again["reference"]["cached"] and again["reference"]["artifact"] == ran["reference"]["artifact"]
    assert not again["evaluate"]["cached"] and again["evaluate"]["score"] > ran["evaluate"]["score"]
    # compare reads pass/fail per problem, which the objective has not: one line, not a KeyError
    cmp = subprocess.run([sys.executable, "-m", "moeprune", "compare", str(tmp_path / "a")], capture_output=True,
                         text=True)
    assert cmp.returncode == 2 and "passes or fails no problem" in cmp.stderr and "Traceback" not in cmp.stderr


def test_held_out_prompts_that_the_calibration_profiles_are_left_out(tmp_path):
    texts = tmp_path / "heldout"
    texts.mkdir()
    calib = ["ADD:12+34=", "ADD:5+6=", "ADD:71+8="]
    held = calib[:2] + ["ADD:90+9=", "ADD:3+33="]
    (texts / "generic_math.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    (tmp_path / "calib.txt").write_text("\n".join(calib) + "\n")
    args = ["bench=divergence", f"bench.texts={texts}", "bench.split=all", "bench.top_logprobs=384",
            f"calibration.classes.generic_math=[{{kind: text, path: {tmp_path / 'calib.txt'}}}]", "calibration.score_tokens=all", "evaluate.virtual=true", "keep.experts_per_layer=8",
            "stages.evaluate_base=false"]
    run = moeprune(args, tmp_path / "cache", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    ran = stages(tmp_path / "run")
    assert ran["reference"]["left_out_in_calibration"] == 2 and ran["reference"]["samples"] == 2


@pytest.mark.parametrize("args, says", [
    (["bench.split=calib"], "bench.split=calib: expected one of ('val', 'test') (calib is the profile's)"),
    (["bench.texts=/nonexistent/heldout"], "bench.texts=/nonexistent/heldout: not a directory"),
    (["bench.metric=bleu"], "bench.metric"),
    (["bench.thinking_budget=8"], "expected bench.thinking_budget=null"),
    (["backend=openai", "backend.base_url=http://127.0.0.1:9/v1"], "expected backend=hf"),
    (["quant_tier=q4_k_m"], "has no evaluate_quant"),
])
def test_bad_divergence_settings_are_refused_in_one_line(tmp_path, args, says):
    run = moeprune(["bench=divergence", *args], tmp_path / "cache", tmp_path / "run")
    assert run.returncode == 2, run.stderr
    assert says in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "cache").exists()
