"""benchmarks/proxy_fidelity.py's bookkeeping: a killed run resumes, an earlier run's rows are reused
only for the recipes both draws share, and nothing from another draw is mixed in."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("proxy_fidelity",
                                              Path(__file__).parents[1] / "benchmarks" / "proxy_fidelity.py")
pf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pf)


def args(out: Path, recipes: int, **kw) -> argparse.Namespace:
    base = dict(out=str(out), recipes=recipes, seed=0, n_val=100, n_test=100, calib=64, budgets="8,4", reuse=None,
                model="toy")
    return argparse.Namespace(**{**base, **kw})


def draw(a) -> dict[str, list[str]]:
    rng = random.Random(a.seed)
    return {**pf.BASELINES, **{f"r{i:03d}": pf.space_point(rng) for i in range(a.recipes)}}


def row(name: str, overrides: list[str]) -> dict:
    return {"name": name, "overrides": overrides, "objective": {}, "test": {"ALL": 0.5}}


def test_a_draw_with_more_recipes_starts_with_the_smaller_draws_recipes(tmp_path):
    small, big = draw(args(tmp_path, 5)), draw(args(tmp_path, 9))
    assert list(big.items())[:len(small)] == list(small.items())


def test_reuse_takes_the_earlier_runs_rows_only_where_name_and_overrides_match(tmp_path):
    a = args(tmp_path / "out", 9, reuse=str(tmp_path / "old.json"))
    recipes = draw(a)
    old_rows = [row(n, o) for n, o in list(recipes.items())[:5]] + [row("r004", ["strategy=other"])]
    old_rows[-2] = row("r001", ["strategy=not_this_draws"])  # same name, other recipe: not taken
    Path(a.reuse).write_text(json.dumps({"args": {"seed": 0, "n_val": 100, "n_test": 100, "calib": 64,
                                                  "model": "toy"}, "records": {"8": old_rows}}))
    (tmp_path / "out").mkdir()
    pf.reuse(tmp_path / "out", a, recipes)
    saved = pf.load_partial(tmp_path / "out", a)
    assert [r["name"] for r in saved[8]] == ["REAP", "frequency", "gate mass", "r000"]
    assert saved[4] == []


def test_reuse_refuses_a_run_of_other_sizes_or_another_model(tmp_path):
    a = args(tmp_path, 9, reuse=str(tmp_path / "old.json"))
    Path(a.reuse).write_text(json.dumps({"args": {"seed": 0, "n_val": 50, "n_test": 100, "calib": 64,
                                                  "model": "other"}, "records": {}}))
    with pytest.raises(SystemExit, match="model, n_val differ"):
        pf.reuse(tmp_path, a, draw(a))


def test_a_partial_file_resumes_its_own_draw_and_refuses_another(tmp_path):
    a = args(tmp_path, 9)
    pf.save_partial(tmp_path, a, {8: [row("REAP", ["strategy=reap"])]})
    assert pf.load_partial(tmp_path, a) == {8: [row("REAP", ["strategy=reap"])]}
    assert not (tmp_path / "partial.json.tmp").exists()
    with pytest.raises(SystemExit, match="holds another draw"):
        pf.load_partial(tmp_path, args(tmp_path, 10))


def test_the_paired_test_scores_the_objectives_choice_task_by_task_as_the_records_did(tmp_path):
    """A small run on the shipped toy model: the verdicts behind the paired test give the chosen
    recipe's recorded test accuracy, and a recipe compared with itself differs by 0 (p = 1)."""
    a = args(tmp_path, 1, n_val=4, n_test=4, calib=8, budgets="8", model=str(pf.TOY), batch_size=64, device="cpu")
    lab = pf.Lab(a)
    records = pf.evaluate(lab, draw(a), [8])
    analysis = pf.analyse(records)
    result = pf.paired(lab, records, analysis)[8]
    chosen = next(r for r in records[8] if r["name"] == analysis[8]["metrics"]["kl"]["chosen"])
    assert result["n"] == 6 * 4 and result["accuracy"] == pytest.approx(chosen["test"]["ALL"])
    assert set(result["vs"]) == set(pf.BASELINES)
    if chosen["name"] in pf.BASELINES:
        assert result["vs"][chosen["name"]] == {"diff": 0.0, "p": 1.0}
    assert (tmp_path / "partial.json").is_file()


def test_merge_refuses_a_budget_that_two_runs_both_hold(tmp_path, monkeypatch):
    for d, other in (("a", "4"), ("b", "6")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "fidelity.json").write_text(json.dumps({"args": vars(args(tmp_path, 9)),
                                                                "records": {"8": [], other: []}}))
    monkeypatch.setattr("sys.argv", ["proxy_fidelity.py", "--merge", str(tmp_path / "a"), str(tmp_path / "b"),
                                     "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match=r"budget\(s\) \[8\] come from more than one run"):
        pf.main()
    assert not (tmp_path / "m").exists()


def test_paired_and_replot_name_the_missing_run(tmp_path, monkeypatch):
    for mode in ("--paired", "--replot"):
        monkeypatch.setattr("sys.argv", ["proxy_fidelity.py", mode, "--out", str(tmp_path / "none")])
        with pytest.raises(SystemExit, match="fidelity.json does not exist: expected the --out of a finished run"):
            pf.main()


def test_merge_joins_runs_of_one_draw_under_their_sizes_and_refuses_another_draw(tmp_path, monkeypatch):
    rows = [{**row(n, o), "objective": {m: {"ALL": i / 10, **{c: i / 10 for c in pf.world.CLASSES}} for m in pf.METRICS},
             "test": {"ALL": i / 10, **{c: i / 10 for c in pf.world.CLASSES}}, "val": {"ALL": 0.5},
             "seconds": {"objective": 1.0, "generation": 1.0}}
            for i, (n, o) in enumerate(draw(args(tmp_path, 3)).items())]
    for d, budget, n_test in (("a", "8", 50), ("b", "4", 50), ("c", "6", 100)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "fidelity.json").write_text(json.dumps({"args": vars(args(tmp_path, 3, n_test=n_test)),
                                                                "records": {budget: rows}}))
    monkeypatch.setattr(pf, "plot", lambda records, path: None)  # no matplotlib needed here
    monkeypatch.setattr("sys.argv", ["proxy_fidelity.py", "--merge", str(tmp_path / "a"), str(tmp_path / "b"),
                                     "--out", str(tmp_path / "m")])
    pf.main()
    merged = json.loads((tmp_path / "m" / "fidelity.json").read_text())
    assert merged["args"]["n_test"] == 50 and merged["args"]["budgets"] == "8,4"  # what --paired reads back
    assert set(merged["records"]) == {"8", "4"}
    monkeypatch.setattr("sys.argv", ["proxy_fidelity.py", "--merge", str(tmp_path / "a"), str(tmp_path / "c"),
                                     "--out", str(tmp_path / "m2")])
    with pytest.raises(SystemExit, match="differs from .* in n_test: expected runs of one draw"):
        pf.main()
