"""A two-stage study from the CLI: trials minimize the objective without generation, the best are
re-scored by generation on val, and `moeprune report --test` scores the choice once on test against
REAP, frequency and gate mass."""

from __future__ import annotations

import json
from pathlib import Path

from sweep_support import SMALL, moeprune, trial_records


def test_a_two_stage_study_confirms_its_best_trials_by_generation_and_reports_the_choice_on_test(
        sweep_model, sweep_cache, tmp_path):
    fixed = [f"model.path={sweep_model}", *SMALL]
    moeprune(["-m", "hparams_search=toy_two_stage_8of16", *fixed, "hydra.sweeper.n_trials=5",
              "hydra.sweeper.confirm.top=2", f"hydra.sweeper.storage=journal:{tmp_path}/two.journal",
              f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path, sweep_cache)
    records = trial_records(tmp_path / "sweep")
    assert sorted(records) == [0, 1, 2, 3, 4] and {r["state"] for r in records.values()} == {"COMPLETE"}
    for rec in records.values():  # stage 1: the objective, teacher-forced, no generation
        stages = json.loads((rec["dir"] / "run.json").read_text())["stages"]
        assert stages["evaluate"]["bench"] == "divergence" and stages["evaluate"]["metric"] == "kl"
        assert rec["values"] == [stages["evaluate"]["score"]] and rec["directions"] == ["minimize"]

    confirm = json.loads((tmp_path / "sweep" / "confirm.json").read_text())
    best_two = sorted(records, key=lambda n: (records[n]["values"][0], n))[:2]
    assert [c["trial"] for c in confirm["candidates"]] == best_two  # the two lowest KLs, best first
    for c in confirm["candidates"]:  # stage 2: generation on toy_suite's val split
        summary = json.loads((Path(json.loads((Path(c["job_dir"]) / "run.json").read_text())["stages"]["evaluate"]
                                   ["artifact"]) / "summary.json").read_text())
        assert summary["bench"] == "toy_suite" and summary["settings"]["bench"]["split"] == "val"
        assert c["confirm_value"] == summary["score"]
    top = max(confirm["candidates"], key=lambda c: (c["confirm_value"], -confirm["candidates"].index(c)))
    assert confirm["chosen"] == top["trial"]

    out = tmp_path / "report"
    proc = moeprune(["report", str(tmp_path / "sweep"), "--out", str(out), "--test"], tmp_path, sweep_cache)
    md = (out / "report-toy_two_stage_8of16.md").read_text()
    assert f"the choice is trial {confirm['chosen']}" in md and proc.stdout.count("wrote") >= 1
    _, _, test_md = md.partition("and REAP, frequency and gate mass on test")
    rows = [ln.split(" | ")[0].strip("| ") for ln in test_md.splitlines() if ln.startswith("| ")]
    assert rows[:5] == ["recipe", f"trial {confirm['chosen']}", "REAP", "frequency", "gate mass"]
    assert f"| trial {confirm['chosen']} vs gate mass |" in test_md
    for name in ("REAP", "frequency", "gate-mass"):  # each baseline ran once, on toy_suite's test split
        summary = json.loads((Path(json.loads((out / f"test-toy_two_stage_8of16/{name}/run.json").read_text())
                                   ["stages"]["evaluate"]["artifact"]) / "summary.json").read_text())
        assert summary["bench"] == "toy_suite" and summary["settings"]["bench"]["split"] == "test"


def test_a_confirmation_on_the_test_split_is_refused_before_the_study_exists(sweep_model, sweep_cache, tmp_path):
    proc = moeprune(["-m", "hparams_search=toy_two_stage_8of16", f"model.path={sweep_model}", *SMALL,
                     "hydra.sweeper.confirm.overrides=['bench=toy_suite','bench.split=test']",
                     f"hydra.sweeper.storage=journal:{tmp_path}/two.journal", f"hydra.sweep.dir={tmp_path}/sweep"],
                    tmp_path, sweep_cache, check=False)
    assert proc.returncode == 2 and "confirmation runs would score bench.split=test" in proc.stderr
    assert not (tmp_path / "two.journal").exists()


def test_report_test_on_a_one_stage_objective_study_says_it_needs_a_confirmation(sweep_model, sweep_cache, tmp_path):
    moeprune(["-m", "hparams_search=toy_two_stage_8of16", f"model.path={sweep_model}", *SMALL, "hydra.sweeper.n_trials=1",
              "hydra.sweeper.confirm.top=0", f"hydra.sweeper.storage=journal:{tmp_path}/one.journal",
              f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path, sweep_cache)
    assert not (tmp_path / "sweep" / "confirm.json").exists()
    proc = moeprune(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--test"], tmp_path,
                    sweep_cache, check=False)
    assert proc.returncode == 2 and "passes or fails no task to compare on test" in proc.stderr, proc.stderr[-2000:]
    assert "hydra.sweeper.confirm.top >= 1" in proc.stderr and not (tmp_path / "report" / "test-toy_two_stage_8of16").exists()
