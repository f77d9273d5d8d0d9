"""Budget curve: where does targeting the hard-code class pay, from 12 down to 3 of 16 experts kept?

On the trained toy model and one cached `completion` profile (the toy default: only the
answer-producing positions are counted; 64 calibration tasks per class), for each keep count:
- the rows, each scored by virtual pruning on `test` (n tasks per class): the generic criteria
  (REAP, frequency, gate mass, max-uniform = the default recipe), the published analogs (toy_v4,
  toy_v6_coder, toy_v7_coderx at their own shared-FFN alpha), class-targeted recipes
  (class_weights=coder over each base statistic, and recipe=toy_coder);
- a TPE study on `val` (seed 0, multivariate) whose objective is targeted_code_hard, ties broken
  by the mean of the other five classes (value = target + others / 1000: val scores move in steps
  of 1/n, so the tie-break never outweighs one target task). Its space is the CLI presets' space
  (conf/hparams_search/toy_coder_4of16.yaml) and its first trials are every row above, enqueued, so
  the chosen recipe can only match or beat them on val. The searched row is that study's best;
  nothing is chosen on test;
- the paired difference on test between the searched recipe and the best generic criterion (chosen
  on val by the same objective), on targeted_code_hard and on the other five classes pooled
  (exact McNemar p).
Then the headline (the smallest keep count at which each row holds targeted_code_hard at >= 90% of
the base model's test score, and the other classes there), whether any row dominates max-uniform at
every budget, and the plot (targeted_code_hard on test against experts kept, one line per row).
Results are written after every budget (--out/results.json, --json, --png), so a partial run is kept.

    python benchmarks/budget_curve.py [--keeps 8,4,3,6,12,10,7,5] [--trials 100] [--n-test 200] [--n-val 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_search  # noqa: E402  (the Lab: model, cached profile, drop maps, virtual scoring)

from moeprune.registrations import PKG_DIR, register  # noqa: E402
from moeprune import artifacts  # noqa: E402
from moeprune.evaluate.stats import mcnemar, wilson  # noqa: E402
from moeprune.toy import world  # noqa: E402

register()  # the config schema and resolvers, before anything composes

TARGET = "targeted_code_hard"
OTHERS = [c for c in world.CLASSES if c != TARGET]
VAL = recipe_search.VAL
KEEPS = (8, 4, 3, 6, 12, 10, 7, 5)  # run order: the budgets with known contrasts first, so a partial run has them

# Every row as a point of the search space: strategy, strategy.score, normalize, alpha, protect_top,
# breadth_bonus, class_weights, floor_clamp, shared_ffn_alpha. With strategy=sum, normalize=none and
# no bonus/protection/floor, score=reap|frequency|gate_mass gives exactly that baseline's map
# (tests/test_dropmap_stage.py); the other points are the presets' own knobs.
_BASE = {"strategy": "sum", "normalize": "none", "alpha": 2.0, "protect_top": 0, "breadth_bonus": 0.0,
         "class_weights": "uniform", "floor_clamp": "none", "shared_ffn_alpha": 1.0}
_MAX = {**_BASE, "strategy": "max", "score": "legacy", "normalize": "rank"}  # conf/strategy/max.yaml
_CODER_V6 = {**_MAX, "breadth_bonus": 0.5, "protect_top": 2, "class_weights": "toy_lcb_only", "shared_ffn_alpha": 1.2}
GENERIC = {
    "max-uniform (default)": _MAX,
    "REAP": {**_BASE, "score": "reap"},
    "frequency": {**_BASE, "score": "frequency"},
    "gate mass": {**_BASE, "score": "gate_mass"},
}
PUBLISHED = {
    "toy_v4": {**_MAX, "normalize": "mean", "protect_top": 2, "class_weights": "five_class"},
    "toy_v6_coder": _CODER_V6,
    "toy_v7_coderx": {**_CODER_V6, "floor_clamp": "ratio_24_40"},
}
TARGETED = {
    "REAP, coder": {**_BASE, "score": "reap", "class_weights": "coder"},
    "frequency, coder": {**_BASE, "score": "frequency", "class_weights": "coder"},
    "gate mass, coder": {**_BASE, "score": "gate_mass", "class_weights": "coder"},
    "toy_coder (max, coder)": {**_MAX, "class_weights": "coder"},
}
ROWS = {**GENERIC, **PUBLISHED, **TARGETED}
SEARCHED = "searched (val)"
FIXED_TARGETED = "toy_coder (max, coder)"
CLASS_WEIGHTS = ["uniform", "five_class", "coder", "toy_lcb_only"]


def overrides(p: dict, keep: int) -> list[str]:
    """A point of the space as run overrides at `keep` experts per layer (outlier knobs: the max
    preset's; the published presets' `keep` and the median clamp on non-finite cells only agree)."""
    return [f"strategy={p['strategy']}", f"strategy.score={p['score']}", f"strategy.normalize={p['normalize']}",
            f"strategy.alpha={p['alpha']:.4f}", f"strategy.protect_top={p['protect_top']}",
            f"strategy.breadth_bonus={p['breadth_bonus']:.4f}", f"class_weights={p['class_weights']}",
            f"floor_clamp={p['floor_clamp']}", f"prune.shared_ffn_alpha={p['shared_ffn_alpha']:.4f}",
            f"keep.experts_per_layer={keep}"]


def suggest(trial: optuna.Trial) -> dict:
    """conf/hparams_search/toy_coder_4of16.yaml's space."""
    return {"strategy": trial.suggest_categorical("strategy", ["max", "mean", "geomean", "sum"]),
            "score": trial.suggest_categorical("score", ["legacy", "mean", "reap", "frequency", "gate_mass"]),
            "normalize": trial.suggest_categorical("normalize", ["rank", "mean", "none"]),
            "alpha": trial.suggest_float("alpha", 0.0, 4.0),
            "protect_top": trial.suggest_int("protect_top", 0, 2),
            "breadth_bonus": trial.suggest_float("breadth_bonus", 0.0, 1.0),
            "class_weights": trial.suggest_categorical("class_weights", CLASS_WEIGHTS),
            "floor_clamp": trial.suggest_categorical("floor_clamp", ["none", "ratio_24_40"]),
            "shared_ffn_alpha": trial.suggest_float("shared_ffn_alpha", 0.8, 1.3)}


class Scorer:
    """Scores (drop map, shared-FFN alpha) pairs once per split: TPE re-samples points whose maps
    are equal (e.g. every alpha of a base statistic), and a repeated map generates the same tokens."""

    def __init__(self, lab: recipe_search.Lab, memo_dir: Path | None = None):
        self.lab, self.memo, self.evaluated, self.memo_dir = lab, {}, 0, memo_dir

    def __call__(self, p: dict, keep: int, split: str, n: int, classes: list[str] | None = None) -> dict[str, dict]:
        m = self.lab.drop_map(overrides(p, keep))
        key = (artifacts.hash_json(m.as_json()), round(p["shared_ffn_alpha"], 6), split, n, tuple(classes or ()))
        if key not in self.memo:
            self.memo[key] = self._stored(key) or self._evaluate(key, m, p, split, n, classes)
        return self.memo[key]

    def _stored(self, key) -> dict | None:
        path = self._path(key)
        return artifacts.read_json(path) if path and path.is_file() else None

    def _evaluate(self, key, m, p: dict, split: str, n: int, classes) -> dict[str, dict]:
        self.evaluated += 1
        tasks = self.lab.score(m, split, n, shared_ffn_alpha=p["shared_ffn_alpha"], classes=classes)
        if self._path(key):
            artifacts.write_json(self._path(key), tasks)
        return tasks

    def _path(self, key) -> Path | None:
        """--memo keeps every evaluation on disk: a run killed mid-study (a 10-minute GPU call) is
        run again with the same seed, and TPE, seeing the same values, replays the same trials from
        the memo in seconds and goes on where the killed run stopped."""
        if self.memo_dir is None:
            return None
        settings = (self.lab.args.model, self.lab.args.calib, self.lab.args.seed)  # what else decides the answer
        return self.memo_dir / f"{artifacts.hash_json([list(map(str, key)), list(map(str, settings))])[:24]}.json"


def accs(tasks: dict[str, dict]) -> dict[str, float]:
    acc = {c: statistics.mean(t["pass"] for t in tasks.values() if t["category"] == c) for c in world.CLASSES}
    acc["others"] = statistics.mean(t["pass"] for t in tasks.values() if t["category"] != TARGET)  # pooled, = mean (equal n)
    acc["ALL"] = statistics.mean(t["pass"] for t in tasks.values())
    return acc


def objective_key(acc: dict) -> tuple[float, float]:
    return acc[TARGET], -1.0 if acc.get("others") is None else acc["others"]


def search(score: Scorer, keep: int, n_trials: int, n_val: int, seed: int) -> dict:
    enq = list(ROWS.values())
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=len(enq) + 10, multivariate=True)
    study = optuna.create_study(study_name=f"coder_{keep}of16", direction="maximize", sampler=sampler)
    for p in enq:
        study.enqueue_trial(p)
    records = []

    def objective(trial):
        # The target's 100 tasks first: a trial below the best target so far cannot be chosen (the
        # tie-break is worth < one target task), so only the generic rows (the best-generic pick) and
        # trials at or above that target are generated on all six classes. Greedy outputs do not
        # depend on which classes share the batch (checked task by task), so both scores agree.
        p = suggest(trial)
        best = max((r["val"][TARGET] for r in records), default=-1.0)
        acc = None
        if trial.number >= len(GENERIC):
            part = score(p, keep, VAL, n_val, [TARGET])
            tch = statistics.mean(t["pass"] for t in part.values())
            if tch < best:
                acc = {TARGET: tch, "others": None}
        if acc is None:
            acc = accs(score(p, keep, VAL, n_val))
        records.append({"number": trial.number, "point": p, "val": acc})
        return acc[TARGET] + (acc["others"] or 0.0) / 1000

    study.optimize(objective, n_trials=max(n_trials, len(enq)))
    best = max(records, key=lambda r: (objective_key(r["val"]), -r["number"]))  # the first of equals
    return {"trials": records, "best": best, "n_trials": len(records),
            "all_classes": sum(r["val"]["others"] is not None for r in records)}


def cell(tasks: dict, classes: list[str]) -> dict:
    ids = [i for i, t in tasks.items() if t["category"] in classes]
    k = sum(tasks[i]["pass"] for i in ids)
    lo, hi = wilson(k, len(ids))
    return {"k": k, "n": len(ids), "acc": k / len(ids), "lo": lo, "hi": hi}


def fmt(c: dict) -> str:
    return f"{100 * c['acc']:.1f} [{100 * c['lo']:.0f}, {100 * c['hi']:.0f}]"


def paired(a: dict, b: dict, classes: list[str]) -> dict:
    d, p = mcnemar({i: a[i]["pass"] for i in a if a[i]["category"] in classes}, {i: b[i]["pass"] for i in b})
    return {"diff": d, "p": p}


def budget_table(keep: int, r: dict) -> str:
    head = ["row", *world.CLASSES, "other five", "ALL", "val: target / other five"]
    searched = (f"searched: trial #{r['search']['best']['number']} of {r['search']['n_trials']}" if r["search"]["best"]
                else "no search at this budget: the fixed rows only")
    lines = [f"**{keep} of 16 kept** (best generic on val: {r['best_generic']}; {searched})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in r["rows"].items():
        v = row.get("val")
        vcell = "-" if not v else f"{100 * v[TARGET]:.0f} / " + ("-" if v["others"] is None else f"{100 * v['others']:.1f}")
        lines.append(f"| {name} | " + " | ".join(fmt(row["cells"][c]) for c in [*world.CLASSES, "others", "ALL"])
                     + f" | {vcell} |")
    if not r["vs_best_generic"]:
        return "\n".join(lines)
    t, o = r["vs_best_generic"][TARGET], r["vs_best_generic"]["others"]
    lines += ["", f"searched − {r['best_generic']} on test: {TARGET} {100 * t['diff']:+.1f} points (p={t['p']:.2g}), "
              f"other five {100 * o['diff']:+.1f} (p={o['p']:.2g}). Searched point: `{' '.join(r['searched_overrides'])}`"]
    return "\n".join(lines)


def summary(result: dict) -> str:
    budgets = sorted(result["budgets"], key=int, reverse=True)
    base = result["base"]
    names = row_names(result)
    lines = ["| row | " + " | ".join(f"{k} kept" for k in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            fmt(result["budgets"][k]["rows"][name]["cells"][TARGET]) if name in result["budgets"][k]["rows"] else "-"
            for k in budgets) + " |")
    # the searched recipe, and the fixed targeted recipe (recipe=toy_coder, chosen before any score), against
    # the best generic criterion of the budget, on the same test tasks
    lines += ["", "| keep | best generic (val) | Δ target, searched − best generic (p) | Δ other five (p) "
              f"| Δ target, {FIXED_TARGETED} − best generic (p) | Δ other five (p) |", "|---|---|---|---|---|---|"]
    for k in budgets:
        r = result["budgets"][k]
        rows, g = r["rows"], r["best_generic"]
        if r["vs_best_generic"]:
            t, o = r["vs_best_generic"][TARGET], r["vs_best_generic"]["others"]
            cells = [f"{100 * t['diff']:+.1f} (p={t['p']:.2g})", f"{100 * o['diff']:+.1f} (p={o['p']:.2g})"]
        else:
            cells = ["not searched", "-"]
        if "tasks" in rows[g]:
            for cls in ([TARGET], OTHERS):
                d = paired(rows[FIXED_TARGETED]["tasks"], rows[g]["tasks"], cls)
                cells.append(f"{100 * d['diff']:+.1f} (p={d['p']:.2g})")
        lines.append(f"| {k} | {g} | " + " | ".join(cells) + " |")
    # the headline: the smallest keep holding the target at >= 90% of base, and the rest there
    thr = 0.9 * base[TARGET]["acc"]
    lines += ["", f"smallest keep count holding {TARGET} >= 90% of base ({100 * base[TARGET]['acc']:.1f} → "
              f">= {100 * thr:.1f}); base other five {fmt(base['others'])}:", "",
              "| row | smallest keep | target there | other five there | Δ other five vs base |", "|---|---|---|---|---|"]
    for name in names:
        held = [int(k) for k in budgets if name in result["budgets"][k]["rows"]
                and result["budgets"][k]["rows"][name]["cells"][TARGET]["acc"] >= thr]
        if not held:
            ks = [k for k in budgets if name in result["budgets"][k]["rows"]]
            lines.append(f"| {name} | none of {', '.join(ks)} | - | - | - |")
            continue
        c = result["budgets"][str(min(held))]["rows"][name]["cells"]
        lines.append(f"| {name} | {min(held)} | {fmt(c[TARGET])} | {fmt(c['others'])} | "
                     f"{100 * (c['others']['acc'] - base['others']['acc']):+.1f} |")
    lines += ["", "dominance over max-uniform (test accuracy >= at every budget the row has, on ALL and on the target):"]
    mu = "max-uniform (default)"
    for name in names:
        if name == mu:
            continue
        ks = [k for k in budgets if name in result["budgets"][k]["rows"]]
        lose = [f"{k} ({c})" for k in ks for c in ("ALL", TARGET) if result["budgets"][k]["rows"][name]["cells"][c]["acc"]
                < result["budgets"][k]["rows"][mu]["cells"][c]["acc"]]
        lines.append(f"- {name} (at {', '.join(ks)}): " + (f"below at {', '.join(lose)}" if lose else "dominates"))
    return "\n".join(lines)


def row_names(result: dict) -> list[str]:
    """The rows of any budget, in ROWS order (the searched row only where a study ran)."""
    have = {n for b in result["budgets"].values() for n in b["rows"]}
    return [n for n in [*ROWS, SEARCHED] if n in have]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(int(k) for k in result["budgets"])
    names = row_names(result)
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=110)
    styles = {**{n: "-" for n in GENERIC}, **{n: ":" for n in PUBLISHED}, **{n: "--" for n in TARGETED}}
    for i, name in enumerate(names):
        ks = [k for k in budgets if name in result["budgets"][str(k)]["rows"]]
        cs = [result["budgets"][str(k)]["rows"][name]["cells"][TARGET] for k in ks]
        y = [100 * c["acc"] for c in cs]
        # clamped: at 0/n or n/n the Wilson bound equals the accuracy up to rounding, which may be -1e-16
        err = [[max(0.0, 100 * (c["acc"] - c["lo"])) for c in cs], [max(0.0, 100 * (c["hi"] - c["acc"])) for c in cs]]
        # the searched row exists only where a study ran: markers alone, no line across unsearched budgets
        searched = name == SEARCHED and len(ks) < len(budgets)
        ax.errorbar([k + 0.035 * (i - len(names) / 2) for k in ks], y, yerr=err,
                    fmt="s" if searched else styles.get(name, "-") + "o", ms=7 if name == SEARCHED else 3.5,
                    lw=2.6 if name == SEARCHED else 1.3, capsize=2, label=name,
                    color="black" if name == SEARCHED else ([f"C{j}" for j in range(10)] + ["navy"])[i % 11])
    base = 100 * result["base"][TARGET]["acc"]
    ax.axhline(base, color="0.4", lw=1, ls="-.", label=f"base model ({base:.1f})")
    ax.axhline(0.9 * base, color="0.7", lw=1, ls="-.", label="90% of base")
    ax.set_xlabel("experts kept per layer (of 16)")
    ax.set_ylabel(f"{TARGET}, test accuracy % (95% Wilson)")
    ax.set_title(f"Budget curve on the completion profile ({result['n_test']} test tasks per class)")
    ax.set_xticks(budgets)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def run_budget(score: Scorer, keep: int, args) -> dict:
    t0 = time.perf_counter()
    if args.trials:
        s = search(score, keep, args.trials, args.n_val, args.seed)
    else:  # rows only: the generic rows on val (the best-generic pick), no study, no searched row
        s = {"trials": [{"number": i, "point": p, "val": accs(score(p, keep, VAL, args.n_val))}
                        for i, p in enumerate(GENERIC.values())], "best": None, "n_trials": 0, "all_classes": len(GENERIC)}
    val = {}
    for r in s["trials"]:  # a row's own (first, enqueued) trial
        val.setdefault(tuple(sorted(r["point"].items())), r["val"])
    rows = {}
    for name, p in [*ROWS.items(), *([(SEARCHED, s["best"]["point"])] if s["best"] else [])]:
        tasks = score(p, keep, "test", args.n_test)
        rows[name] = {"point": p, "tasks": tasks, "val": val.get(tuple(sorted(p.items()))),
                      "cells": {**{c: cell(tasks, [c]) for c in world.CLASSES}, "others": cell(tasks, OTHERS),
                                "ALL": cell(tasks, list(world.CLASSES))}}
    best_generic = max(GENERIC, key=lambda n: objective_key(rows[n]["val"]))  # chosen on val, as the search
    print(f"keep {keep}: {s['n_trials']} trials ({s['all_classes']} on all classes), {time.perf_counter() - t0:.0f} s; "
          f"best {s['best'] and (s['best']['number'], objective_key(s['best']['val']))}", flush=True)
    if not s["best"]:
        return {"rows": rows, "search": s, "best_generic": best_generic, "searched_overrides": None, "vs_best_generic": None}
    a, b = rows[SEARCHED]["tasks"], rows[best_generic]["tasks"]
    return {"rows": rows, "search": s, "best_generic": best_generic,
            "searched_overrides": overrides(s["best"]["point"], keep),
            "vs_best_generic": {TARGET: paired(a, b, [TARGET]), "others": paired(a, b, OTHERS)}}


def write(result: dict, out: Path, args) -> None:
    """results.json (every task) under out; the per-budget counts (--json), the plot and the tables."""
    artifacts.write_json(out / "results.json", json.loads(json.dumps(result, default=str)))
    compact = json.loads(json.dumps({k: v for k, v in result.items() if k != "studies"}, default=str))
    for b in compact["budgets"].values():
        for row in b["rows"].values():
            row.pop("tasks", None)  # absent in a part merged from a --json file
    artifacts.write_json(Path(args.json), compact)
    plot(result, Path(args.png))
    text = "\n\n".join(budget_table(int(k), result["budgets"][k]) for k in sorted(result["budgets"], key=int, reverse=True))
    tmp = out / ".tables.md.tmp"
    tmp.write_text(text + "\n\n" + summary(result) + "\n")
    tmp.replace(out / "tables.md")


def merge(dirs: list[str], args) -> None:
    """One result from runs over disjoint budgets (e.g. two processes) of the same settings. A part is
    an --out dir (results.json: every task) or a --json file (counts only: its budgets keep their
    tables and paired tests, but no test against the fixed targeted recipe can be recomputed). A part
    may keep only some of its budgets: PATH:8+4 (a counts file whose other budgets a new run replaces)."""
    parts = []
    for d in dirs:
        path, _, keep = d.partition(":")
        part = artifacts.read_json(Path(path) if path.endswith(".json") else Path(path) / "results.json")
        if keep:
            missing = [k for k in keep.split("+") if k not in part["budgets"]]
            if missing:
                raise SystemExit(f"--merge {d}: {path} has no budget {', '.join(missing)}: expected one of "
                                 f"{'+'.join(part['budgets'])}")
            part["budgets"] = {k: v for k, v in part["budgets"].items() if k in keep.split("+")}
        parts.append(part)
    same = ("profile", "calib_per_class", "n_test", "n_val", "seed", "base")
    seen = set()
    for p in parts:
        if any(p[k] != parts[0][k] for k in same) or seen & set(p["budgets"]):
            raise SystemExit(f"--merge: {dirs} are not disjoint budgets of one setting")
        seen |= set(p["budgets"])
    walls = [w for p in parts for w in (p["wall_s"] if isinstance(p["wall_s"], list) else [p["wall_s"]])]
    result = {**parts[0], "budgets": {}, "studies": {}, "wall_s": walls,
              "maps_evaluated": sum(p["maps_evaluated"] for p in parts)}
    for p in parts:
        result["budgets"].update(p["budgets"])
        result["studies"].update(p.get("studies", {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(result, out, args)
    print((out / "tables.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(PKG_DIR / "toy" / "model"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    ap.add_argument("--trials", type=int, default=100,
                    help="trials per budget (the enqueued rows included); 0: the fixed rows only, no study")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench/budget_curve")
    ap.add_argument("--json", default="docs/budget_curve.json", help="the per-budget counts (no per-task rows)")
    ap.add_argument("--png", default="docs/budget_curve.png")
    ap.add_argument("--merge", default="",
                    help="comma-separated --out dirs (or --json files) of runs over disjoint budgets: write their union")
    ap.add_argument("--memo", default="", help="a dir that keeps every evaluation: run a killed run again to resume it")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge.split(","), args)
    args.score_tokens = "completion"  # the Lab's profile: the toy default
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t_start = time.perf_counter()
    lab = recipe_search.Lab(args)
    score = Scorer(lab, Path(args.memo) if args.memo else None)
    base_tasks = lab.score(None, "test", args.n_test)
    base = {**{c: cell(base_tasks, [c]) for c in world.CLASSES}, "others": cell(base_tasks, OTHERS),
            "ALL": cell(base_tasks, list(world.CLASSES))}
    print(f"profile + base in {time.perf_counter() - t_start:.0f} s; base {TARGET} {fmt(base[TARGET])}", flush=True)
    result = {"profile": "completion", "calib_per_class": args.calib, "n_test": args.n_test, "n_val": args.n_val,
              "trials": args.trials, "seed": args.seed, "device": args.device, "base": base, "budgets": {}, "studies": {}}
    for keep in [int(k) for k in args.keeps.split(",") if k]:
        r = run_budget(score, keep, args)
        result["studies"][str(keep)] = r["search"]["trials"]
        result["budgets"][str(keep)] = {**r, "search": {k: v for k, v in r["search"].items() if k != "trials"}}
        result["wall_s"], result["maps_evaluated"] = time.perf_counter() - t_start, score.evaluated
        write(result, lab.out, args)  # after every budget: a partial run is kept
        print(budget_table(keep, result["budgets"][str(keep)]), flush=True)
    print(summary(result))
    print(f"wall {time.perf_counter() - t_start:.0f} s; {score.evaluated} distinct (map, alpha, split, classes) "
          "evaluations", flush=True)


if __name__ == "__main__":
    main()
