"""The coder recipe study from the CLI, as benchmarks/recipe_search.py runs it in-process: a few
trials of `moeprune -m hparams_search=toy_coder_8of16` on the shipped toy model, then
`moeprune report` on its sweep dir."""

from __future__ import annotations

import json
from pathlib import Path

from sweep_support import SMALL, moeprune, trial_records

TARGET = "targeted_code_hard"
OBJECTIVES = [f"evaluate.per_category.{TARGET}", f"evaluate.others_mean.{TARGET}"]


def _non_dominated(values: dict[int, list[float]]) -> set[int]:
    """Trials no other trial beats on one objective without losing on the other (both maximized)."""
    return {n for n, a in values.items()
            if not any(b[0] >= a[0] and b[1] >= a[1] and b != a for m, b in values.items() if m != n)}


def test_the_coder_study_runs_from_the_cli_on_val_and_the_report_marks_its_pareto_front(sweep_model, sweep_cache,
                                                                                         tmp_path):
    fixed = [f"model.path={sweep_model}", *SMALL]
    moeprune(["-m", "hparams_search=toy_coder_8of16", *fixed, "hydra.sweeper.n_trials=5",
              f"hydra.sweeper.storage=journal:{tmp_path}/coder.journal", f"hydra.sweep.dir={tmp_path}/sweep"],
             tmp_path, sweep_cache)
    records = trial_records(tmp_path / "sweep")
    assert sorted(records) == [0, 1, 2, 3, 4] and {r["state"] for r in records.values()} == {"COMPLETE"}
    # trial 0 is the default recipe; 1-3 the enqueued baselines, points of the nested space
    assert records[0]["params"]["strategy"] == "max" and records[0]["params"]["strategy.score"] == "legacy"
    for number, score in ((1, "reap"), (2, "frequency"), (3, "gate_mass")):
        p = records[number]["params"]
        assert (p["strategy"], p["strategy.score"], p["strategy.normalize"], p["strategy.breadth_bonus"],
                p["strategy.protect_top"], p["floor_clamp"], p["prune.shared_ffn_alpha"]) == \
            ("sum", score, "none", 0.0, 0, "none", 1.0)
    values = {}
    for number, rec in records.items():
        stages = json.loads((rec["dir"] / "run.json").read_text())["stages"]
        per_cat = stages["evaluate"]["per_category"]
        others = [v for c, v in per_cat.items() if c != TARGET]
        assert rec["objectives"] == OBJECTIVES and rec["directions"] == ["maximize", "maximize"]
        assert rec["values"] == [per_cat[TARGET], sum(others) / len(others)] and len(others) == 5
        summary = json.loads((Path(stages["evaluate"]["artifact"]) / "summary.json").read_text())
        assert summary["settings"]["bench"]["split"] == "val", "the study scores val, never test"
        values[number] = rec["values"]

    out = tmp_path / "report"
    proc = moeprune(["report", str(tmp_path / "sweep"), "--out", str(out), "--test"], tmp_path, sweep_cache)
    md = (out / "report-toy_coder_8of16.md").read_text()
    assert (out / "pareto-toy_coder_8of16.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench.split=val" in md and "benchmarks/recipe_search.py" in md and "wrote" in proc.stdout
    trials_md, _, test_md = md.partition("and REAP on test")
    head, *rows = [line.split("|")[1:-1] for line in trials_md.splitlines() if line.startswith("| ")]
    col = {h.strip(): i for i, h in enumerate(head)}
    assert len(rows) == 5 and list(col)[3:5] == OBJECTIVES
    marked = {int(r[col["trial"]]) for r in rows if r[col["front"]].strip() == "*"}
    assert marked == _non_dominated(values) and marked
    assert f"{len(marked)} on the Pareto front of {OBJECTIVES[0]} vs {OBJECTIVES[1]}" in md
    # the printed command scores the best trial's recipe on test, outside the sweep
    best = max(values, key=lambda n: (values[n][0], values[n][1], -n))
    command = next(line for line in md.splitlines() if line.startswith("Score it on test"))
    assert f"trial {best}:" in md and command.endswith("bench.split=test`") and "hydra." not in command

    # --test: the best trial and REAP, each run once on test; the table's cells are those runs' scores
    runs = {name: json.loads((out / "test-toy_coder_8of16" / name / "run.json").read_text())["stages"]
            for name in (f"trial-{best}", "REAP")}
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in test_md.splitlines() if line.startswith("| ") and not line.startswith("| recipe")}
    assert list(lines) == [f"trial {best}", "REAP"] and lines["REAP"][-2:] == ["+0.0 (p=1)", "+0.0 (p=1)"]
    for name, row in zip(runs, lines.values()):
        summary = json.loads((Path(runs[name]["evaluate"]["artifact"]) / "summary.json").read_text())
        assert summary["settings"]["bench"]["split"] == "test"
        assert [float(c.split()[0]) for c in row[:7]] == \
            [round(100 * v, 1) for v in [*summary["per_category"].values(), summary["score"]]]
    # the REAP point of the nested space (trial 1) wrote strategy=reap's own map
    maps = [json.loads((Path(stages["dropmap"]["artifact"]) / "drop_map.json").read_text())
            for stages in (runs["REAP"], json.loads((records[1]["dir"] / "run.json").read_text())["stages"])]
    assert maps[0] == maps[1] and all(len(v) == 8 for v in maps[0].values())


def test_an_enqueued_point_outside_the_space_stops_the_sweep_before_any_trial(sweep_model, sweep_cache, tmp_path):
    bad = moeprune(["-m", "hparams_search=toy_coder_8of16", f"model.path={sweep_model}", *SMALL,
                    "hydra.sweeper.enqueue=[{strategy: reap}]", f"hydra.sweeper.storage=journal:{tmp_path}/j.journal",
                    f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path, sweep_cache, check=False)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "hydra.sweeper.enqueue[0].strategy='reap' is outside its search space" in bad.stderr
    assert not trial_records(tmp_path / "sweep")


def test_one_budget_of_the_curve_runs_from_the_cli_with_the_benchmarks_rows_first(sweep_model, sweep_cache, tmp_path):
    moeprune(["-m", "hparams_search=toy_coder_4of16", f"model.path={sweep_model}", *SMALL, "hydra.sweeper.n_trials=3",
              f"hydra.sweeper.storage=journal:{tmp_path}/b.journal", f"hydra.sweep.dir={tmp_path}/sweep"],
             tmp_path, sweep_cache)
    records = trial_records(tmp_path / "sweep")
    assert sorted(records) == [0, 1, 2] and {r["state"] for r in records.values()} == {"COMPLETE"}
    # trial 0 the default recipe (max-uniform), then the curve's REAP and frequency rows
    assert (records[0]["params"]["strategy"], records[0]["params"]["class_weights"]) == ("max", "uniform")
    assert [records[n]["params"]["strategy.score"] for n in (1, 2)] == ["reap", "frequency"]
    for rec in records.values():
        stages = json.loads((rec["dir"] / "run.json").read_text())["stages"]
        drop = json.loads((Path(stages["dropmap"]["artifact"]) / "drop_map.json").read_text())
        assert all(len(v) == 12 for v in drop.values()), "4 of 16 experts kept in every layer"
        assert rec["objectives"] == OBJECTIVES
