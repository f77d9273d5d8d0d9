"""The per-class table a run prints and logs: base, pruned, and the quantized file when evaluated."""

from moeprune.report import class_rows, results_table

BASE = {"bench": "toy_suite", "score": 0.5, "per_category": {"a": 1.0, "b": 0.0}, "num_experts": 16,
        "size_bytes": 16_400_000}
PRUNED = {"bench": "toy_suite", "score": 0.25, "per_category": {"a": 0.5, "b": 0.0}, "num_experts": 12,
          "size_bytes": 13_200_000}


def test_base_and_pruned_rows():
    headers, rows = class_rows({"evaluate_base": BASE, "evaluate": PRUNED})
    assert headers == ["class", "base", "pruned", "delta"]
    assert rows == [["a", 1.0, 0.5, -0.5], ["b", 0.0, 0.0, 0.0], ["ALL", 0.5, 0.25, -0.25]]
    assert class_rows({"dropmap": {}}) == ([], [])
    assert class_rows({"evaluate": PRUNED})[1][-1] == ["ALL", None, 0.25, None]


def test_the_quantized_file_gets_a_column_headed_by_its_type_and_the_delta():
    quant = {"bench": "toy_suite", "score": 0.0, "per_category": {"a": 0.0, "b": 0.0}, "num_experts": 12,
             "size_bytes": 4_400_000}
    results = {"evaluate_base": BASE, "evaluate": PRUNED, "quant": {"type": "Q4_K_M"}, "evaluate_quant": quant}
    headers, rows = class_rows(results)
    assert headers == ["class", "base", "pruned", "Q4_K_M", "delta"]
    assert rows[-1] == ["ALL", 0.5, 0.25, 0.0, -0.5]
    table = results_table(results).splitlines()
    assert table[0].split() == headers and table[-1].split() == ["size", "16.4", "MB", "13.2", "MB", "4.4", "MB"]
    assert table[-2].split() == ["experts/layer", "16", "12", "12"]
    assert table[2].split() == ["a", "100.0%", "50.0%", "0.0%", "-100.0"]


def test_study_report_writes_every_study_even_one_without_a_completed_trial(tmp_path):
    import json

    from moeprune.study_report import report

    def trial(study, number, state, values, kept):
        d = tmp_path / "sweep" / f"{study}-{number}"
        d.mkdir(parents=True)
        (d / "optuna_trial.json").write_text(json.dumps({
            "study": study, "number": number, "state": state, "params": {"strategy.alpha": 1.0 + number},
            "values": values, "directions": ["maximize"], "objectives": ["evaluate.score"], "recorded": "t"}))
        if kept is not None:
            (d / "run.json").write_text(json.dumps({"stages": {"dropmap": {"kept_total": kept}}}))

    trial("aaa", 0, "FAIL", None, None)  # sorts first: it must not stop the report of "alpha"
    trial("alpha", 0, "COMPLETE", [0.5], 48)
    trial("alpha", 1, "COMPLETE", [0.75], 40)
    written = report([tmp_path / "sweep"], tmp_path / "out")
    assert sorted(p.name for p in written) == ["pareto-alpha.png", "report-aaa.md", "report-alpha.md"]
    assert "none completed, so no Pareto plot" in (tmp_path / "out" / "report-aaa.md").read_text()
    assert "1 on the Pareto front" in (tmp_path / "out" / "report-alpha.md").read_text()
