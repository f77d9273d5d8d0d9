"""A sweep killed mid-trial (SIGKILL: no handler runs) and resumed: the dead process's RUNNING trial
is failed and its parameters retried, the resumed run completes its trial count, no trial is left
RUNNING, and the enqueued default recipe gets a complete trial exactly once. The sweeper runs in a
minimal Hydra app whose task kills its own process at a chosen trial."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

APP = '''\
import os, signal, sys
import hydra
import hydra_plugins.moeprune_optuna_sweeper as plugin

plugin.register()


@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def task(cfg):
    if os.environ.get("KILL_AT_TRIAL") == os.environ.get("MOEPRUNE_TRIAL"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-trial, as SLURM's or the OOM killer's SIGKILL
    return (cfg.x - 0.3) ** 2


if __name__ == "__main__":
    task()
'''

CONFIG = '''\
defaults:
  - override hydra/sweeper: optuna
  - _self_
x: 1.5
hydra:
  sweeper:
    direction: minimize
    study_name: resume
    storage: journal:{root}/study.log
    n_trials: 3
    enqueue_default: true
    params:
      x: interval(0.0, 2.0)
  sweep:
    dir: {root}/sweep
'''


def sweep(root: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    env.pop("KILL_AT_TRIAL", None)
    if kill_at is not None:
        env["KILL_AT_TRIAL"] = str(kill_at)
    return subprocess.run([sys.executable, str(root / "app.py"), "-m"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def load(root: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="resume",
                             storage=optuna.storages.JournalStorage(JournalFileBackend(str(root / "study.log"))))


@pytest.mark.parametrize("kill_at", [0, 1], ids=["during the default trial", "during a sampled trial"])
def test_a_sweep_killed_mid_trial_and_resumed_completes_with_nothing_left_running(tmp_path, kill_at):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "cfg.yaml").write_text(CONFIG.format(root=tmp_path))
    killed = sweep(tmp_path, kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = load(tmp_path).trials
    assert [t.state for t in before][kill_at] == optuna.trial.TrialState.RUNNING  # what a kill leaves
    stale = before[kill_at]

    resumed = sweep(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = load(tmp_path).trials
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert trials[kill_at].state == optuna.trial.TrialState.FAIL
    assert "died" in trials[kill_at].user_attrs["error"]
    new = trials[len(before):]
    assert [t.state.name for t in new] == ["COMPLETE"] * 3  # the resumed run's own n_trials, all complete
    assert new[0].params == stale.params and new[0].user_attrs["retry_of"] == kill_at  # retried first
    defaults = [t for t in trials if t.params == {"x": 1.5} and t.state == optuna.trial.TrialState.COMPLETE]
    assert len(defaults) == 1  # held until complete, then never enqueued again

    again = sweep(tmp_path)  # a third run with nothing stale: no retry, no second default
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(tmp_path).trials
    assert len([t for t in trials if t.params == {"x": 1.5}]) == (2 if kill_at == 0 else 1)
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)


def test_a_running_trial_of_a_live_process_is_left_alone(tmp_path):
    from hydra_plugins.moeprune_optuna_sweeper import _core

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="live")
    mine = study.ask()
    mine.set_user_attr(_core.WORKER_ATTR, _core.this_worker())  # this process: alive
    elsewhere = study.ask()
    elsewhere.set_user_attr(_core.WORKER_ATTR, {"host": "another-node", "pid": 1, "started": "1"})
    assert _core.fail_stale_trials(study) == []
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]
