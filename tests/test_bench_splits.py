"""Every bench has a `val` split a study can select on: the dataset benches' val and test are halves
by a hash of each task id, disjoint, together the whole set, and the same whatever the row order; a
split a bench cannot serve is refused; a sweep on test (or the whole set, which holds it) is refused
for every bench preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import moeprune.cli  # noqa: F401  (registers the schema and the sweeper plugin)
from hydra_plugins.moeprune_optuna_sweeper import _split_guard
from hydra_plugins.moeprune_optuna_sweeper._search_space import SearchSpace
from moeprune.config import build
from moeprune.errors import MoePruneError

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).resolve().parent / "fixtures"
DATASET_BENCHES = [  # every preset with a real-format fixture: (preset, fixture)
    ("humaneval", "humanevalplus.jsonl"), ("humanevalplus", "humanevalplus.jsonl"), ("mbpp", "mbpp_sanitized.jsonl"),
    ("lcb_medium_55", "lcb.jsonl"), ("multipl_e", "multipl_e.jsonl"), ("gsm8k_100", "gsm8k.jsonl"),
    ("math500_100", "math500.jsonl"), ("aime_2024", "aime_2024.jsonl"), ("gpqa_diamond", "gpqa_diamond.jsonl"),
    ("arc_challenge", "arc_challenge.jsonl"), ("ifeval_100", "ifeval.jsonl")]


def compose_run(*overrides: str):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


def ids(preset: str, path: Path, split: str) -> list[str]:
    """The split's tasks, each as its prompt (an id may be a row index, which a shuffle moves)."""
    return [s.prompt for s in build(compose_run(f"bench={preset}", f"bench.data.path={path}", "bench.n=null",
                                            f"bench.split={split}").bench).samples()]


def shuffled(fixture: str, tmp_path: Path) -> Path:
    lines = [ln for ln in (FIX / fixture).read_text().splitlines() if ln.strip()]
    lines = lines[1:] + lines[:1]  # every row moves (a small fixture's shuffle may leave the halves as they were)
    out = tmp_path / fixture
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize("preset, fixture", DATASET_BENCHES)
def test_val_and_test_are_disjoint_halves_stable_under_a_shuffled_dataset(preset, fixture, tmp_path):
    whole = ids(preset, FIX / fixture, "all")
    val, test = ids(preset, FIX / fixture, "val"), ids(preset, FIX / fixture, "test")
    assert not set(val) & set(test) and sorted(val + test) == sorted(whole)
    moved = shuffled(fixture, tmp_path)
    assert sorted(ids(preset, moved, "val")) == sorted(val) and sorted(ids(preset, moved, "test")) == sorted(test)


def test_the_halves_split_a_large_set_about_evenly_and_humaneval_serves_them():
    from moeprune.evaluate.benches.base import task_split

    halves = [task_split(f"HumanEval/{i}") for i in range(164)]
    assert 60 <= halves.count("val") <= 104  # a fair coin per id, fixed by the id
    he = build(compose_run("bench=humaneval", "bench.split=val").bench).samples()
    assert len(he) == halves.count("val") and all(task_split(s.id) == "val" for s in he)
    assert len(build(compose_run("bench=humaneval").bench).samples()) == 164  # the whole set stays the default


@pytest.mark.parametrize("overrides, says", [
    (["bench=humaneval", "bench.split=train"], "bench.split=train: expected one of ('all', 'val', 'test')"),
    (["bench=gsm8k_100", "bench.split=validation"], "the dataset's own split is bench.data.split"),
    (["bench=toy_suite", "bench.split=all"], "bench.split=all: expected one of ('train', 'calib', 'val', 'test')"),
])
def test_a_split_a_bench_cannot_serve_is_refused(overrides, says):
    with pytest.raises(MoePruneError, match=None) as e:
        build(compose_run(*overrides).bench)
    assert says in str(e.value)


def test_the_dataset_split_moved_to_bench_data_split():
    bench = build(compose_run("bench=gpqa_diamond").bench)
    assert bench.data_split == "train" and bench.split == "all"
    assert build(compose_run("bench=gsm8k_100", "bench.data.split=train").bench).data_split == "train"


BENCH_PRESETS = sorted(p.stem for p in (REPO / "conf" / "bench").glob("*.yaml"))


@pytest.mark.parametrize("preset", BENCH_PRESETS)
@pytest.mark.parametrize("split", [None, "test", "all"])
def test_a_sweep_that_selects_on_test_or_the_whole_set_is_refused_for_every_bench(preset, split):
    overrides = [f"bench={preset}", "optimized_metric=evaluate.score"]
    cfg = compose_run(*overrides, *([f"bench.split={split}"] if split else []))
    if split is None and cfg.bench.split == "val":  # a preset that selects on val already (divergence)
        _split_guard.check(cfg, SearchSpace({}, {}, []), allow_test_split=False)
        return
    if split == "all" and preset.startswith("toy_suite"):
        return  # the toy suite has no `all` (refused when built, above)
    with pytest.raises(MoePruneError, match="the sweep would choose its best trial on"):
        _split_guard.check(cfg, SearchSpace({}, {}, []), allow_test_split=False)
    _split_guard.check(compose_run(*overrides, "bench.split=val"), SearchSpace({}, {}, []), allow_test_split=False)
