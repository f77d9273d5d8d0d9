"""`moeprune report <dir>...`: a study's trials as a table and a Pareto plot, from files on disk.

A sweep leaves, in every job dir, the sweeper's `optuna_trial.json` (trial number, params, values,
state) and the runner's `run.json` (each stage's metrics). This command walks the given dirs for
them (a study resumed over several sweeps spans several dirs; give them all, or a common parent),
and writes per study `report-<study>.md` (the table) and `pareto-<study>.png`: the objective
against a cost (the second objective of a two-objective study, else experts kept), Pareto front
marked in both. No W&B or Optuna storage is needed.

The trials' scores are on the split the study searched (`bench.split`, read from each job's
resolved config, and said in the report). `--test` scores the best trial once on the test split,
next to REAP at the same keep, with Wilson intervals and the exact McNemar p
(moeprune/study_holdout.py); without it the report prints the command that scores the best trial
on test as an ordinary run. benchmarks/recipe_search.py makes the docs' fuller table (every
baseline on test).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moeprune import artifacts
from moeprune.errors import MoePruneError

TRIAL_FILE = "optuna_trial.json"
DEFAULT_COST = "dropmap.kept_total"


@dataclass
class Trial:
    study: str
    number: int
    state: str
    params: dict
    values: Optional[list[float]]
    directions: list[str]
    objectives: list[str]
    job_dir: Path
    recorded: str
    metrics: dict = field(default_factory=dict)  # "stage.key" -> number, from run.json
    overrides: list = field(default_factory=list)  # the job's command-line overrides
    split: Optional[str] = None  # the bench split the trial scored (its resolved config)

    def metric(self, name: str) -> Optional[float]:
        if name in self.objectives and self.values is not None:
            return self.values[self.objectives.index(name)]
        return self.metrics.get(name)


def _flat(results: dict, prefix: str = "") -> dict[str, float]:
    """{stage: {k: v, per_category: {c: v}}} -> {"stage.k": v, "stage.per_category.c": v}, numbers only."""
    out = {}
    for k, v in (results or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _split(job_dir: Path) -> Optional[str]:
    from omegaconf import OmegaConf

    config = job_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    split = OmegaConf.select(OmegaConf.load(config), "bench.split", default=None)
    return None if split is None else str(split)


def load_trials(dirs: list[Path]) -> list[Trial]:
    found: dict[tuple[str, int], Trial] = {}
    for d in dirs:
        if not Path(d).is_dir():
            raise MoePruneError(f"report: {d} is not a directory; expected a sweep dir (hydra.sweep.dir) or a parent of one")
        for path in sorted(Path(d).rglob(TRIAL_FILE)):
            rec = artifacts.read_json(path)
            run_json = path.parent / "run.json"
            metrics = _flat(artifacts.read_json(run_json)["stages"]) if run_json.exists() else {}
            t = Trial(rec["study"], int(rec["number"]), rec["state"], rec.get("params") or {}, rec.get("values"),
                      rec.get("directions") or ["minimize"], rec.get("objectives") or [], path.parent,
                      rec.get("recorded", ""), metrics, list(rec.get("overrides") or []), _split(path.parent))
            key = (t.study, t.number)
            if key not in found or found[key].recorded <= t.recorded:  # the same trial seen twice: the latest
                found[key] = t
    return sorted(found.values(), key=lambda t: (t.study, t.number))


def pareto_front(points: list[tuple[float, float]], maximize: tuple[bool, bool]) -> list[int]:
    """Indices of the points no other point dominates (at least as good on both, better on one)."""
    sign = [1 if m else -1 for m in maximize]
    p = [(x * sign[0], y * sign[1]) for x, y in points]  # now both maximized
    return [i for i, a in enumerate(p)
            if not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in p)]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(trials: list[Trial], cost: str, front: set[int] = frozenset()) -> str:
    """One row per trial; `front` (trial numbers) marked `*` in the column "front"."""
    params = sorted({k for t in trials for k in t.params})
    objectives = trials[0].objectives or [f"value{i}" for i in range(len(trials[0].directions))]
    head = ["trial", "state", "front", *objectives, cost if cost not in objectives else None, *params]
    head = [h for h in head if h is not None]
    rows = []
    for t in trials:
        values = t.values or [None] * len(objectives)
        extra = [] if cost in objectives else [t.metric(cost)]
        rows.append([t.number, t.state, "*" if t.number in front else "", *values, *extra,
                     *[t.params.get(k) for k in params]])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class Front:
    """The completed trials that have the cost, their (cost, objective) points, and which of them
    no other trial dominates."""
    done: list[Trial]
    points: list[tuple[float, float]]
    indices: list[int]
    x_max: bool
    y_max: bool

    @property
    def numbers(self) -> set[int]:
        return {self.done[i].number for i in self.indices}


def front_of(trials: list[Trial], cost: str) -> Optional[Front]:
    """None when no trial completed."""
    y_max = trials[0].directions[0] == "maximize"
    x_max = len(trials[0].directions) > 1 and cost in trials[0].objectives and \
        trials[0].directions[trials[0].objectives.index(cost)] == "maximize"
    completed = [t for t in trials if t.state == "COMPLETE" and t.values]
    if not completed:
        return None
    done = [t for t in completed if t.metric(cost) is not None]
    if not done:
        raise MoePruneError(f"report: no completed trial of study {trials[0].study} has the metric {cost}; pass "
                            "--cost STAGE.KEY naming a metric in the trials' run.json")
    pts = [(t.metric(cost), t.values[0]) for t in done]
    return Front(done, pts, pareto_front(pts, (x_max, y_max)), x_max, y_max)


def plot(trials: list[Trial], cost: str, front: Front, out: Path) -> None:
    """Objective (y) against cost (x), the Pareto front drawn and labelled by trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_name = trials[0].objectives[0] if trials[0].objectives else "value0"
    pts = front.points
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, color="0.65", label="trials")
    fp = sorted((pts[i] for i in front.indices), key=lambda p: p[0])
    ax.plot([p[0] for p in fp], [p[1] for p in fp], "o-", color="C3", label="Pareto front")
    labels: dict[tuple[float, float], list[str]] = {}  # trials on the same point share one label
    for i in front.indices:
        labels.setdefault(pts[i], []).append(str(front.done[i].number))
    for point, names in labels.items():
        ax.annotate(",".join(names), point, textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{cost} ({'higher' if front.x_max else 'lower'} is better)")
    ax.set_ylabel(f"{y_name} ({'higher' if front.y_max else 'lower'} is better)")
    ax.set_title(f"study {trials[0].study}: {len(pts)} completed trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)


CONFIRM_FILE = "confirm.json"


def load_confirms(dirs: list[Path]) -> dict[str, dict]:
    """study -> the latest confirm.json of a two-stage study found under `dirs`."""
    found: dict[str, dict] = {}
    for d in dirs:
        for path in sorted(Path(d).rglob(CONFIRM_FILE)):
            rec = artifacts.read_json(path)
            if rec["study"] not in found or found[rec["study"]]["recorded"] <= rec["recorded"]:
                found[rec["study"]] = rec
    return found


def confirm_table(confirm: dict, objectives: list[str]) -> str:
    head = ["trial", *(objectives or ["value"]), f"{confirm['metric']} (confirmation)", "chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in confirm["candidates"]:
        value = _fmt(r["confirm_value"]) if r["confirm_value"] is not None else f"failed: {r['error']}"
        lines.append(f"| {r['trial']} | " + " | ".join(_fmt(v) for v in r["values"] or []) + f" | {value} | "
                     + ("*" if r["trial"] == confirm["chosen"] else "") + " |")
    return "\n".join(lines)


def best_trial(trials: list[Trial]) -> Optional[Trial]:
    """The first objective's best; a two-objective study breaks ties on its second (the coder use
    case: the target first, then the rest as little hurt as possible)."""
    done = [t for t in trials if t.state == "COMPLETE" and t.values]
    if not done:
        return None
    signs = [1 if d == "maximize" else -1 for d in done[0].directions]
    return max(done, key=lambda t: (signs[0] * t.values[0], *(s * v for s, v in zip(signs[1:], t.values[1:])), -t.number))


def report(dirs: list[Path], out_dir: Optional[Path] = None, cost: Optional[str] = None, test: bool = False,
           n_test: Optional[int] = None) -> list[Path]:
    trials = load_trials(dirs)
    if not trials:
        raise MoePruneError(f"report: no {TRIAL_FILE} under {', '.join(map(str, dirs))}; expected the output "
                            "dir of a `moeprune -m hparams_search=...` sweep")
    out_dir = Path(out_dir or dirs[0])
    confirms = load_confirms(dirs)
    written = []
    for study in sorted({t.study for t in trials}):
        st = [t for t in trials if t.study == study]
        c = cost or (st[0].objectives[1] if len(st[0].objectives) > 1 else DEFAULT_COST)
        y_name = st[0].objectives[0] if st[0].objectives else "value0"
        front = front_of(st, c)
        png = out_dir / f"pareto-{study}.png"
        if front is not None:
            plot(st, c, front, png)
        done = [t for t in st if t.state == "COMPLETE" and t.values]
        best, confirm = best_trial(st), confirms.get(study)
        if confirm is not None:  # a two-stage study: its choice is the best confirmed trial
            best = next(t for t in st if t.number == confirm["chosen"])
        splits = sorted({t.split for t in st if t.split is not None})
        lines = [f"# study {study}", "",
                 f"{len(st)} trials ({len(done)} completed), "
                 + (f"{len(front.indices)} on the Pareto front of {y_name} vs {c} (marked *)."
                    if front is not None else "none completed, so no Pareto plot (the table says why they failed)."),
                 f"Scores on the split the study searched: bench.split={', '.join(splits) or 'unknown'}. "
                 "The docs' test-split table (every baseline, Wilson intervals, paired McNemar vs REAP) "
                 "comes from benchmarks/recipe_search.py (docs/recipes.md)"
                 + ("; the best trial's own test row is below." if test else "; `--test` scores the best trial "
                    "on test here."), ""]
        if best:
            from moeprune import study_holdout

            values = ", ".join(f"{n} {_fmt(v)}" for n, v in zip(best.objectives or [y_name], best.values))
            if confirm is not None:
                lines += [f"Two stages: the best {len(confirm['candidates'])} trials by {y_name}, re-scored with "
                          f"{' '.join(confirm['overrides'])} ({confirm['direction']} {confirm['metric']}); "
                          f"the choice is trial {best.number}.", "", confirm_table(confirm, best.objectives), ""]
            else:
                lines += [f"Best ({st[0].directions[0]} {y_name}): trial {best.number}: {values}.",
                          f"Score it on test: `{study_holdout.on_test(best)}`", ""]
        lines += [table(st, c, front.numbers if front else set()), ""]
        if test and best:
            against = "REAP, frequency and gate mass" if confirm else "REAP"
            lines += [f"## trial {best.number} and {against} on test", "",
                      "Accuracy % [95% Wilson interval]; Δ: paired difference vs REAP on the same tasks, points "
                      "(exact McNemar p).", "",
                      study_holdout.holdout_table(best, out_dir / f"test-{study}", n_test, confirm), ""]
        md = out_dir / f"report-{study}.md"
        _write(md, "\n".join(lines))
        print("\n".join(lines))
        written += [md] + ([png] if front is not None else [])
    return written


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str]) -> int:
    from moeprune.cli_args import Parser

    ap = Parser(prog="moeprune report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", metavar="DIR", nargs="+", type=Path, help="sweep output dirs (or a parent of them)")
    ap.add_argument("--out", type=Path, default=None, help="where to write report-*.md / pareto-*.png (default: the first dir)")
    ap.add_argument("--cost", default=None, help=f"x axis, a STAGE.KEY metric (default: the 2nd objective, else {DEFAULT_COST})")
    ap.add_argument("--test", action="store_true", help="score the best trial and REAP once on the test split")
    ap.add_argument("--n-test", type=int, default=None, help="test tasks per class for --test (default: the study's)")
    args = ap.parse_args(argv)
    if args.n_test is not None and (args.n_test < 1 or not args.test):
        print(f"moeprune report: error: --n-test={args.n_test}: expected a count >= 1, with --test", file=sys.stderr)
        return 2
    try:
        for p in report(args.dirs, args.out, args.cost, args.test, args.n_test):
            print(f"wrote {p}")
    except MoePruneError as e:
        print(f"moeprune report: error: {e}", file=sys.stderr)
        return 2
    return 0
