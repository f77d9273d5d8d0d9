"""A sweep killed mid-trial or inside `study.ask` (SIGKILL: no handler runs; SIGTERM and SIGINT:
unwound) and resumed: the interrupted trial is failed and its parameters retried, the resumed run
completes its trial count, no trial is left RUNNING, and the enqueued default recipe gets a complete
trial exactly once. The sweeper runs in a minimal Hydra app (moeprune's SIGTERM handling installed)
whose task, or whose sampler inside the sweeper's ask, signals its own process at a chosen trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from sweep_support import sweep_cache, sweep_model  # noqa: F401  (fixtures)

APP = '''\
import os, signal, sys
import hydra
import optuna
import hydra_plugins.moeprune_optuna_sweeper as plugin
from moeprune import cli

plugin.register()
SIGNAL = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))


class KillingSampler(optuna.samplers.RandomSampler):
    """Signals the process inside the sweeper's ask of trial KILL_IN_ASK: before its parameters
    (the default trial: all fixed) or after its first (a sampled one), as a kill landing there would."""

    def before_trial(self, study, trial):
        if os.environ.get("KILL_IN_ASK") == str(trial.number) and "fixed_params" in trial.system_attrs:
            os.kill(os.getpid(), SIGNAL)

    def sample_independent(self, study, trial, name, distribution):
        if os.environ.get("KILL_IN_ASK") == str(trial.number) and trial.params:
            os.kill(os.getpid(), SIGNAL)
        return super().sample_independent(study, trial, name, distribution)


@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def task(cfg):
    if os.environ.get("KILL_AT_TRIAL") == os.environ.get("MOEPRUNE_TRIAL"):
        os.kill(os.getpid(), SIGNAL)  # mid-trial, as SLURM's, the OOM killer's or a user's signal
    return (cfg.x - 0.3) ** 2 + (cfg.y - 0.2) ** 2


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, cli._terminate)  # as moeprune's entrypoint: unwound like Ctrl-C
    # Ctrl-C as from a terminal, also when the tests themselves run under nohup or `&` (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        task()
    except KeyboardInterrupt:
        sys.exit(130)
'''

CONFIG = '''\
defaults:
  - override hydra/sweeper: optuna
  - override hydra/sweeper/sampler: random
  - _self_
x: 1.5
y: 0.5
hydra:
  sweeper:
    sampler:
      _target_: app.KillingSampler
    direction: minimize
    study_name: resume
    storage: journal:{root}/study.log
    n_trials: 3
    enqueue_default: true
    params:
      x: interval(0.0, 2.0)
      y: interval(0.0, 1.0)
  sweep:
    dir: {root}/sweep
'''


DEFAULT = {"x": 1.5, "y": 0.5}


def sweep(root: Path, kill_at: int | None = None, signal: str = "SIGKILL",
          in_ask: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KILL_AT_TRIAL", "KILL_IN_ASK")}
    env |= {"HYDRA_FULL_ERROR": "1", "KILL_SIGNAL": signal, "PYTHONPATH": f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    if kill_at is not None:
        env["KILL_AT_TRIAL"] = str(kill_at)
    if in_ask is not None:
        env["KILL_IN_ASK"] = str(in_ask)
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
    defaults = [t for t in trials if t.params == DEFAULT and t.state == optuna.trial.TrialState.COMPLETE]
    assert len(defaults) == 1  # held until complete, then never enqueued again

    again = sweep(tmp_path)  # a third run with nothing stale: no retry, no second default
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(tmp_path).trials
    assert len([t for t in trials if t.params == DEFAULT]) == (2 if kill_at == 0 else 1)
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)


def check_resumed(root: Path, before: list, number: int, planned: dict) -> list:
    """The resume's checks: `number` failed, its planned parameters retried first, the resumed run's
    own three trials complete, nothing left RUNNING or WAITING, the default recipe scored once."""
    resumed = sweep(root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = load(root).trials
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert trials[number].state == optuna.trial.TrialState.FAIL
    new = trials[number + 1:]  # the retry may be queued already (a handler ran), then the run's own
    assert [t.state.name for t in new] == ["COMPLETE"] * 3, states
    assert new[0].user_attrs["retry_of"] == number
    assert {k: new[0].params[k] for k in planned} == planned
    assert len([t for t in trials if t.params == DEFAULT and t.state.name == "COMPLETE"]) == 1, states
    return trials


@pytest.mark.parametrize("signal", ["SIGKILL", "SIGTERM", "SIGINT"])
@pytest.mark.parametrize("number", [0, 1], ids=["the default trial", "a sampled trial after its first parameter"])
def test_a_sweep_killed_inside_ask_retries_its_trial(tmp_path, signal, number):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "cfg.yaml").write_text(CONFIG.format(root=tmp_path))
    killed = sweep(tmp_path, signal=signal, in_ask=number)
    assert killed.returncode in (-9, 130), killed.stderr[-2000:]
    before = load(tmp_path).trials
    stale = before[number]
    assert stale.state.name == ("RUNNING" if signal == "SIGKILL" else "FAIL")  # a handler ran, or none could
    planned = DEFAULT if number == 0 else {"x": stale.params["x"]}  # the params it got before the kill
    if number == 1:
        assert set(stale.params) == {"x"}  # interrupted with part of its parameters
    trials = check_resumed(tmp_path, before, number, planned)
    assert "ask" in trials[number].user_attrs["error"] or "died" in trials[number].user_attrs["error"]


@pytest.mark.parametrize("signal", ["SIGTERM", "SIGINT"])
def test_a_trial_interrupted_by_a_signal_is_recorded_and_retried_on_resume(tmp_path, signal):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "cfg.yaml").write_text(CONFIG.format(root=tmp_path))
    killed = sweep(tmp_path, kill_at=1, signal=signal)
    assert killed.returncode == 130, killed.stderr[-2000:]
    before = load(tmp_path).trials
    assert before[1].state.name == "FAIL" and f"interrupted by {signal}" in before[1].user_attrs["error"]
    record = json.loads((tmp_path / "sweep" / "1" / "optuna_trial.json").read_text())
    assert record["state"] == "FAIL" and record["number"] == 1 and signal in record["error"]
    check_resumed(tmp_path, before, 1, before[1].params)


def test_a_running_trial_of_a_live_process_is_left_alone(tmp_path):
    from hydra_plugins.moeprune_optuna_sweeper import _core

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="live")
    mine = study.ask()
    mine.set_user_attr(_core.WORKER_ATTR, _core.this_worker())  # this process: alive
    elsewhere = study.ask()
    elsewhere.set_user_attr(_core.WORKER_ATTR, {"host": "another-node", "pid": 1, "started": "1"})
    assert _core.fail_stale_trials(study) == []
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]


def test_a_sweep_whose_metric_the_results_lack_stops_after_its_first_trial(tmp_path, sweep_model, sweep_cache):
    """A metric key that only running the stages can refute (evaluate.scor) fails the first trial;
    the sweep then stops with one line instead of running every other trial to the same end."""
    from sweep_support import SMALL, moeprune

    storage = f"sqlite:///{tmp_path}/study.db"
    proc = moeprune(["-m", "hparams_search=toy_recipe", f"model.path={sweep_model}", *SMALL, "logger=none",
                     "optimized_metric=evaluate.scor", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}",
                     f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path, sweep_cache, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moeprune: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "optimized_metric=evaluate.scor: evaluate has no 'scor'" in errors[0] and "the sweep stops" in errors[0]
    trials = optuna.load_study(study_name="toy_recipe", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL"]  # one trial ran, none left RUNNING
