"""An Optuna study through the real CLI: 6 trials into sqlite, the same command again continues to
12; every trial is a W&B offline run grouped by study; `moeprune report` rebuilds the table and the
Pareto plot from disk; the best trial matches or beats the default recipe run on its own."""

from __future__ import annotations

import json

import optuna

from sweep_support import SMALL, moeprune, trial_records, wandb_run


def test_rerunning_the_command_continues_the_study(study):
    root = study["root"]
    trials = optuna.load_study(study_name="toy_recipe", storage=f"sqlite:///{root}/studies/toy.db").trials
    assert study["n_first"] == 6 and [t.number for t in trials] == list(range(12))
    states = {t.state for t in trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}, "no trial left RUNNING"
    failed = {t.number: t.user_attrs for t in trials if t.state != optuna.trial.TrialState.COMPLETE}
    assert not failed, f"every recipe of the toy_recipe space runs: {failed}"
    # the rerun proposes new recipes rather than replaying the first run's
    first = [tuple(sorted(t.params.items())) for t in trials[1:6]]
    assert not set(first) & {tuple(sorted(t.params.items())) for t in trials[6:]}

    records = trial_records(root / "sweep")
    assert sorted(records) == list(range(12))
    profiled = 0
    for t in trials:  # each job dir is named by its trial and holds what the study holds
        rec = records[t.number]
        assert rec["dir"].name == str(t.number) and rec["params"] == t.params and rec["state"] == t.state.name
        if t.state == optuna.trial.TrialState.COMPLETE:
            run = json.loads((rec["dir"] / "run.json").read_text())["stages"]
            assert rec["values"] == t.values == [run["evaluate"]["score"]]
            profiled += not run["profile"]["cached"]
    assert profiled <= 1, "the profile is computed once, not per trial"


def test_every_trial_is_a_wandb_offline_run_grouped_by_study(study):
    for number, rec in trial_records(study["root"] / "sweep").items():
        if rec["state"] != "COMPLETE":
            continue
        (offline,) = (rec["dir"] / "wandb").glob("offline-run-*")
        run = wandb_run(offline)
        assert run["group"] == "toy_recipe" and run["name"] == f"toy_recipe-trial{number}"
        assert run["history"]["trial"] == number and run["history"]["objective/0"] == rec["values"][0]
        for key, value in rec["params"].items():  # the trial's recipe is in the logged config
            if "." in key:
                section, _, name = key.partition(".")
                assert run["config"][section][name] == value
            else:
                assert run["config"][key]["name"] == value


def test_trial_zero_is_the_default_recipe_and_the_best_trial_reproduces(study, sweep_cache, tmp_path):
    root = study["root"]
    run_dir = tmp_path / "default"  # the preset without -m: its settings, the default recipe, one run
    moeprune(["hparams_search=toy_recipe", *study["fixed"], f"hydra.run.dir={run_dir}"], tmp_path, sweep_cache)
    default = json.loads((run_dir / "run.json").read_text())["stages"]["evaluate"]["score"]
    trials = optuna.load_study(study_name="toy_recipe", storage=f"sqlite:///{root}/studies/toy.db").trials
    # trial 0 is the default recipe (enqueue_default): the sweep scores it exactly as a plain run does
    assert trials[0].params["strategy"] == "max" and trials[0].params["strategy.alpha"] == 2.0
    assert trials[0].values == [default]
    # the best trial's recipe, run alone, scores what the study recorded for it
    best = max((t for t in trials if t.values), key=lambda t: t.values[0])
    again = tmp_path / "best"
    moeprune(["hparams_search=toy_recipe", *study["fixed"], *(f"{k}={v}" for k, v in best.params.items()),
              f"hydra.run.dir={again}"], tmp_path, sweep_cache)
    assert json.loads((again / "run.json").read_text())["stages"]["evaluate"]["score"] == best.values[0]


def test_report_writes_table_and_pareto_plot_from_disk(study, tmp_path):
    root = study["root"]
    proc = moeprune(["report", str(root / "sweep"), "--out", str(tmp_path)], tmp_path, root)
    md = (tmp_path / "report-toy_recipe.md").read_text()
    assert "12 trials" in md and md.count("\n| ") == 13  # header + one row per trial
    assert (tmp_path / "pareto-toy_recipe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in proc.stdout

    bad = moeprune(["report", str(tmp_path / "nothing")], tmp_path, root, check=False)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = moeprune(["report", str(empty)], tmp_path, root, check=False)
    assert bad.returncode == 2 and "no optuna_trial.json under" in bad.stderr


def test_multi_objective_study_returns_both_values_and_reports_a_front(sweep_model, sweep_cache, tmp_path):
    moeprune(["-m", "hparams_search=toy_pareto", f"model.path={sweep_model}", *SMALL, "hydra.sweeper.n_trials=3",
              "hydra.sweeper.sampler.population_size=2",
              f"hydra.sweeper.storage=journal:{tmp_path}/pareto.journal", f"hydra.sweep.dir={tmp_path}/sweep"],
             tmp_path, sweep_cache)
    records = trial_records(tmp_path / "sweep")
    assert sorted(records) == [0, 1, 2]
    for rec in records.values():
        run = json.loads((rec["dir"] / "run.json").read_text())["stages"]
        assert rec["objectives"] == ["evaluate.score", "dropmap.kept_total"]
        assert rec["values"] == [run["evaluate"]["score"], run["dropmap"]["kept_total"]]
        assert rec["directions"] == ["maximize", "minimize"]
    moeprune(["report", str(tmp_path / "sweep")], tmp_path, sweep_cache)
    md = (tmp_path / "sweep" / "report-toy_pareto.md").read_text()
    assert "Pareto front of evaluate.score vs dropmap.kept_total" in md
    assert (tmp_path / "sweep" / "pareto-toy_pareto.png").stat().st_size > 1000
