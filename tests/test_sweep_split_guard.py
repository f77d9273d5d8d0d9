"""A sweep cannot silently choose its best trial on the test split that tables report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import moeprune.cli  # noqa: F401  (registers schema, resolvers and the sweeper plugin)

REPO = Path(__file__).resolve().parents[1]

# A stand-in task with a toy_suite bench node: the guard reads only the config and the space.
APP = '''\
import hydra
import hydra_plugins.moeprune_optuna_sweeper as plugin

plugin.register()


@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def task(cfg):
    print("TRIAL", cfg.bench.split)
    return cfg.x


if __name__ == "__main__":
    task()
'''

CONFIG = '''\
defaults:
  - override hydra/sweeper: optuna
  - _self_
x: 1.0
optimized_metric: evaluate.score
bench:
  _target_: moeprune.evaluate.benches.toy_suite.ToySuite
  name: toy_suite
  split: null
hydra:
  sweeper:
    direction: maximize
    study_name: guard
    storage: journal:{root}/study.log
    n_trials: 1
    params:
      x: interval(0.0, 2.0)
  sweep:
    dir: {root}/sweep
'''


def sweep(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    (root / "app.py").write_text(APP)
    (root / "cfg.yaml").write_text(CONFIG.format(root=root))
    return subprocess.run([sys.executable, str(root / "app.py"), "-m", *overrides], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


@pytest.mark.parametrize("overrides, where", [
    ([], "bench.split=null (the default split of bench toy_suite)"),
    (["bench.split=test"], "bench.split=test"),
    (["bench.split=choice(val,test)"], "bench.split=test"),
], ids=["the bench's default", "set to test", "swept over test"])
def test_a_sweep_that_would_optimize_on_test_is_refused_naming_the_knob(tmp_path, overrides, where):
    out = sweep(tmp_path, *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"moeprune: error: the sweep would choose its best trial on {where}" in out.stderr
    assert "hydra.sweeper.allow_test_split=true" in out.stderr and "TRIAL" not in out.stdout
    assert not (tmp_path / "study.log").exists()  # refused before the study was created


@pytest.mark.parametrize("overrides, split", [
    (["bench.split=val"], "val"),
    (["hydra.sweeper.allow_test_split=true"], "None"),
], ids=["on val", "on test, opted in"])
def test_a_sweep_on_val_or_opted_into_test_runs(tmp_path, overrides, split):
    out = sweep(tmp_path, *overrides)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"TRIAL {split}" in out.stdout


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")))
def test_every_sweep_preset_optimizes_on_val_or_says_it_optimizes_on_test(preset):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    assert cfg.bench.split == "val" or cfg.hydra.sweeper.allow_test_split, preset
