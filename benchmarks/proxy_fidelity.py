"""Does choosing a recipe by the objective without generation choose what generation would?

On the shipped toy model and one cached completion profile (the toy default), for each budget (12,
8, 6 and 4 of 16 experts kept): the same `--recipes` recipes drawn at random from the two-stage
study space (conf/hparams_search/toy_two_stage_8of16.yaml: strategy, base score, normalize, alpha,
protection, breadth bonus, class weights, floor, shared-FFN alpha) plus REAP, frequency and gate
mass, each scored

- by the objective (bench=divergence) on the `val` tasks: per class, mean KL(base || pruned), NLL of
  the base's tokens and top-1 agreement over the base's own greedy answers, teacher-forced;
- by generated accuracy (toy_suite, greedy, exact match) on the `test` tasks.

It prints, per budget: the Spearman correlation between each objective (signed so that higher is
better) and test accuracy, per class and overall (the objective's class mean against accuracy over
all classes); the regret of choosing by each objective (test accuracy of its best recipe minus the
best test accuracy among the same recipes, points); and the two-stage choice: the objective's 5 best
re-scored by generation on `val`, the best of those taken, and its test regret; and the objective's
choice against REAP, frequency and gate mass on the same test tasks (paired difference, exact
McNemar). Nothing is chosen on test. Writes fidelity.json and fidelity.png under --out.

    python benchmarks/proxy_fidelity.py [--recipes 150] [--n-val 100] [--n-test 100] [--device cuda]
    python benchmarks/proxy_fidelity.py --budgets 8,4 --out A; ... --budgets 12 --out B   # in parallel
    python benchmarks/proxy_fidelity.py --merge A B --out C                 # one table (runs of one draw)
    python benchmarks/proxy_fidelity.py --reuse OLD/fidelity.json   # OLD's rows of the recipes both drew
    python benchmarks/proxy_fidelity.py --paired --out C    # add the paired test to C's fidelity.json

A run writes partial.json under --out after every recipe and resumes from it when run again.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from moeprune.adapters import adapter_for
from moeprune.evaluate import teacher_forced
from moeprune.evaluate.backends.hf import HFBackend
from moeprune.evaluate.benches.divergence import Divergence
from moeprune.evaluate.benches.toy_suite import ToySuite
from moeprune.evaluate.bench_run import SAMPLES_FILE, read_jsonl, run_bench
from moeprune.evaluate.stats import mcnemar, wilson
from moeprune.models import load_model, load_tokenizer, read_config
from moeprune.prune import recipe as dropmap
from moeprune.dropmap import DropMap, VirtualPrune
from moeprune.profile import Profile
from moeprune.registrations import PKG_DIR, register
from moeprune.runner import Runner
from moeprune.stages import STAGES
from moeprune.toy import world

register()  # the config schema and resolvers, before anything composes

TOY = PKG_DIR / "toy" / "model"
BUDGETS = (12, 8, 6, 4)
METRICS = {"kl": -1, "nll": -1, "agreement": 1}  # sign: higher is better after it
BASELINES = {"REAP": ["strategy=reap"], "frequency": ["strategy=frequency"], "gate mass": ["strategy=gate_mass"]}
TOP = 5  # the two-stage study's confirm.top


def space_point(rng: random.Random) -> list[str]:
    """One recipe of toy_two_stage_8of16's space, drawn uniformly."""
    return [f"strategy={rng.choice(['max', 'mean', 'geomean', 'sum'])}",
            f"strategy.score={rng.choice(['legacy', 'mean', 'reap', 'frequency', 'gate_mass'])}",
            f"strategy.normalize={rng.choice(['rank', 'mean', 'none'])}",
            f"strategy.alpha={rng.uniform(0.0, 4.0):.4f}", f"strategy.protect_top={rng.randint(0, 2)}",
            f"strategy.breadth_bonus={rng.uniform(0.0, 1.0):.4f}",
            f"class_weights={rng.choice(['uniform', 'five_class', 'coder'])}",
            f"floor_clamp={rng.choice(['none', 'ratio_24_40'])}",
            f"prune.shared_ffn_alpha={rng.uniform(0.8, 1.3):.4f}"]


def _ranks(x: list[float]) -> np.ndarray:
    """Ranks with ties sharing their mean rank (as Spearman's rho takes them)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks; nan where one side is constant."""
    a, b = _ranks(x), _ranks(y)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


class Lab:
    def __init__(self, args):
        self.args, self.out, self.device = args, Path(args.out), args.device
        self.model_dir = Path(args.model)
        config = read_config(self.model_dir)
        self.top_k = adapter_for(config).top_k(config)
        self.model = load_model(self.model_dir, "float32", self.device)
        self.tok = load_tokenizer(self.model_dir)
        (self.out / "run").mkdir(parents=True, exist_ok=True)
        runner = Runner(self.cfg([f"calibration.samples_per_class={args.calib}"]), STAGES, self.out / "run")
        runner.run("profile")  # the toy default: score_tokens=completion
        self.profile = Profile.load(runner.dirs["profile"])
        self.objective = Divergence(texts="toy", split="val", n_per_class=args.n_val, chat=False,
                                    max_new_tokens=world.MAX_NEW_TOKENS, top_logprobs=384)
        self.composed: dict[tuple, object] = {}
        self.reference = self.out / "reference"
        if not (self.reference / teacher_forced.REFERENCE_META).is_file():
            self.reference.mkdir(parents=True, exist_ok=True)
            teacher_forced.build_reference(self.objective, self.backend(None, 1.0), self.reference)

    def cfg(self, overrides: list[str]):
        with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
            return compose(config_name="run", overrides=[
                f"model.path={self.model_dir}", f"paths.cache_dir={self.out / 'cache'}",
                f"paths.output_dir={self.out / 'run'}", *overrides])

    def backend(self, drop_map, alpha: float) -> HFBackend:
        return HFBackend(self.model_dir, device=self.device, model=self.model, tokenizer=self.tok,
                         virtual=VirtualPrune(drop_map, alpha), batch_size=self.args.batch_size)

    def recipe(self, budget: int, overrides: list[str]) -> tuple[DropMap, float]:
        key = tuple(overrides)  # composed once per recipe (Hydra's compose costs more than the rest here)
        if key not in self.composed:
            self.composed[key] = self.cfg(overrides)
        cfg = self.composed[key]
        keep = OmegaConf.merge(cfg.keep, {"experts_per_layer": budget})
        m = dropmap.build(self.profile, dropmap.Recipe.of(cfg.strategy, cfg.class_weights, cfg.floor_clamp, keep),
                          self.top_k)
        drop_map = DropMap.parse(m.as_json(), num_experts=self.profile.num_experts, top_k=self.top_k)
        return drop_map, cfg.prune.shared_ffn_alpha

    def divergence(self, drop_map, alpha) -> dict:
        summary, _ = teacher_forced.score(self.objective, self.backend(drop_map, alpha), self.reference)
        return {m: {"ALL": v["score"], **v["per_category"]} for m, v in summary["metrics"].items()}

    def accuracy(self, drop_map, alpha, split: str, n: int) -> dict:
        d = self.out / "eval"
        summary = run_bench(ToySuite(n_per_class=n, split=split), self.backend(drop_map, alpha), d)
        return {"ALL": summary["score"], **summary["per_category"]}

    def verdicts(self, budget: int, overrides: list[str]) -> dict[str, bool]:
        """Pass or fail per test task (what a paired test needs; the records keep class accuracies)."""
        self.accuracy(*self.recipe(budget, overrides), "test", self.args.n_test)
        return {r["id"]: r["pass"] for r in read_jsonl(self.out / "eval" / SAMPLES_FILE)}


def paired(lab: Lab, records: dict, analysis: dict) -> dict:
    """Per budget, the objective's choice (KL) against REAP, frequency and gate mass on the same test
    tasks: the paired difference in accuracy and its exact McNemar p."""
    out = {}
    for budget, rows in records.items():
        by_name = {r["name"]: r for r in rows}
        chosen = analysis[budget]["metrics"]["kl"]["chosen"]
        mine = lab.verdicts(budget, by_name[chosen]["overrides"])
        out[budget] = {"chosen": chosen, "n": len(mine), "accuracy": sum(mine.values()) / len(mine), "vs": {}}
        for name in BASELINES:
            diff, p = mcnemar(mine, lab.verdicts(budget, by_name[name]["overrides"]))
            out[budget]["vs"][name] = {"diff": diff, "p": p}
    return out


def load_partial(out: Path, args) -> dict[int, list[dict]]:
    """What an earlier run with the same draw left in `out` (a killed or timed-out run resumes there);
    a partial file from another draw is refused rather than mixed in."""
    path = out / "partial.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("draw") != draw_key(args):
        raise SystemExit(f"{path} holds another draw ({data.get('draw')}, this run {draw_key(args)}): "
                         "expected the same --recipes/--seed/--n-val/--n-test/--calib, or another --out")
    return {int(b): rows for b, rows in data["records"].items()}


def reuse(out: Path, args, recipes: dict[str, list[str]]) -> None:
    """Start `out`'s partial file from an earlier run's records (`--reuse`): the draw is sequential, so
    a run of the same seed with fewer recipes drew this run's first ones; a row is taken only where
    its name and overrides match this draw's, and only from a run of the same sizes."""
    data = json.loads(Path(args.reuse).read_text())
    old = data["args"]
    mismatch = [k for k in DRAW if k != "recipes" and old.get(k) != getattr(args, k)]
    if mismatch:
        raise SystemExit(f"--reuse {args.reuse}: its {', '.join(mismatch)} differ from this run's: expected the same")
    records = load_partial(out, args)
    for budget in [int(b) for b in args.budgets.split(",")]:
        rows = records.setdefault(budget, [])
        have = {r["name"] for r in rows}
        rows += [r for r in data["records"].get(str(budget), [])
                 if r["name"] not in have and recipes.get(r["name"]) == r["overrides"]]
    save_partial(out, args, records)


DRAW = ("model", "recipes", "seed", "n_val", "n_test", "calib")  # what makes two runs' rows comparable


def draw_key(args) -> dict:
    return {k: getattr(args, k) for k in DRAW}


def evaluate(lab: Lab, recipes: dict[str, list[str]], budgets: list[int]) -> dict:
    records = load_partial(lab.out, lab.args)
    for budget in budgets:
        t0, rows = time.perf_counter(), records.setdefault(budget, [])
        done = {r["name"] for r in rows}
        if done:
            print(f"{budget} of 16: resuming after {len(done)} recipes", flush=True)
        for name, overrides in recipes.items():
            if name in done:
                continue
            drop_map, alpha = lab.recipe(budget, overrides)
            t1 = time.perf_counter()
            obj = lab.divergence(drop_map, alpha)
            t2 = time.perf_counter()
            test = lab.accuracy(drop_map, alpha, "test", lab.args.n_test)
            t3 = time.perf_counter()
            rows.append({"name": name, "overrides": overrides, "objective": obj, "test": test,
                         "seconds": {"objective": t2 - t1, "generation": t3 - t2}})
            save_partial(lab.out, lab.args, records)
        for m, sign in METRICS.items():  # the two-stage choice: objective's best TOP, confirmed on val
            for r in sorted(rows, key=lambda r: -sign * r["objective"][m]["ALL"])[:TOP]:
                if "val" not in r:
                    drop_map, alpha = lab.recipe(budget, r["overrides"])
                    r["val"] = lab.accuracy(drop_map, alpha, "val", lab.args.n_val)
        save_partial(lab.out, lab.args, records)
        print(f"{budget} of 16: {len(rows)} recipes in {time.perf_counter() - t0:.0f} s", flush=True)
    return {b: records[b] for b in budgets}


def save_partial(out: Path, args, records: dict) -> None:
    """After every recipe, atomically: a run cut short loses at most the recipe it was on."""
    tmp = out / "partial.json.tmp"
    tmp.write_text(json.dumps({"draw": draw_key(args), "records": records}))
    tmp.replace(out / "partial.json")


def analyse(records: dict) -> dict:
    out = {}
    for budget, rows in records.items():
        best_test = max(r["test"]["ALL"] for r in rows)
        res = {"best_test": best_test, "metrics": {}}
        for m, sign in METRICS.items():
            score = [sign * r["objective"][m]["ALL"] for r in rows]
            per = {c: spearman([sign * r["objective"][m][c] for r in rows], [r["test"][c] for r in rows])
                   for c in world.CLASSES}
            chosen = max(range(len(rows)), key=lambda i: (score[i], -i))
            top = sorted(range(len(rows)), key=lambda i: (-score[i], i))[:TOP]
            confirmed = max(top, key=lambda i: (rows[i]["val"]["ALL"], -top.index(i)))
            res["metrics"][m] = {
                "spearman_all": spearman(score, [r["test"]["ALL"] for r in rows]), "spearman_per_class": per,
                "spearman_class_mean": statistics.mean(v for v in per.values() if np.isfinite(v)),
                "chosen": rows[chosen]["name"], "regret": best_test - rows[chosen]["test"]["ALL"],
                "two_stage_chosen": rows[confirmed]["name"],
                "two_stage_regret": best_test - rows[confirmed]["test"]["ALL"]}
        t = [r["seconds"] for r in rows]
        res["seconds"] = {k: statistics.mean(s[k] for s in t) for k in ("objective", "generation")}
        out[budget] = res
    return out


def report(analysis: dict, records: dict, args) -> str:
    n = len(next(iter(records.values())))
    lines = [f"Recipes per budget: {n} ({args.recipes} drawn + REAP, frequency, gate mass); "
             f"objective on {args.n_val} val tasks per class, accuracy on {args.n_test} test tasks per class.", "",
             "| kept | metric | Spearman overall | Spearman per class (mean; min) | regret (points) "
             "| two-stage regret | best test ALL |", "|---|---|---|---|---|---|---|"]
    for budget, res in analysis.items():
        for m, r in res["metrics"].items():
            per = [v for v in r["spearman_per_class"].values() if np.isfinite(v)]
            lines.append(f"| {budget} of 16 | {m} | {r['spearman_all']:.3f} | {statistics.mean(per):.3f}; "
                         f"{min(per):.3f} | {100 * r['regret']:.1f} | {100 * r['two_stage_regret']:.1f} | "
                         f"{100 * res['best_test']:.1f} |")
    lines += ["", "| kept | " + " | ".join(world.CLASSES) + " |", "|---|" + "---|" * len(world.CLASSES)]
    for budget, res in analysis.items():
        per = res["metrics"]["kl"]["spearman_per_class"]
        lines.append(f"| {budget} of 16 (kl) | " + " | ".join(f"{per[c]:.3f}" for c in world.CLASSES) + " |")
    if "paired" in analysis.get(next(iter(analysis)), {}):
        lines += ["", "Test accuracy [95% Wilson]; for each generic criterion also chosen − it (points, exact McNemar p):",
                  "", "| kept | chosen by KL | " + " | ".join(BASELINES) + " |", "|---|---|" + "---|" * len(BASELINES)]
        for budget, res in analysis.items():
            pr, tests = res["paired"], {r["name"]: r["test"]["ALL"] for r in records[budget]}
            cells = [f"{pr['chosen']} {_with_interval(pr['accuracy'], pr['n'])}"]
            cells += [f"{_with_interval(tests[name], pr['n'])}, {100 * v['diff']:+.1f} (p={v['p']:.2g})"
                      for name, v in pr["vs"].items()]
            lines.append(f"| {budget} of 16 | " + " | ".join(cells) + " |")
    lines += ["", "| kept | seconds per recipe: objective (val) | generation (test) |", "|---|---|---|"]
    for budget, res in analysis.items():
        lines.append(f"| {budget} of 16 | {res['seconds']['objective']:.2f} | {res['seconds']['generation']:.2f} |")
    return "\n".join(lines)


def read_fidelity(out: Path) -> dict:
    path = out / "fidelity.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: expected the --out of a finished run (or of --merge)")
    return json.loads(path.read_text())


def _with_interval(accuracy: float, n: int) -> str:
    lo, hi = wilson(round(accuracy * n), n)
    return f"{100 * accuracy:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def plot(records: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(records), figsize=(4 * len(records), 3.8), dpi=110)
    for ax, (budget, rows) in zip(np.atleast_1d(axes), records.items()):
        ax.scatter([r["objective"]["kl"]["ALL"] for r in rows], [100 * r["test"]["ALL"] for r in rows], s=12,
                   color="0.5")
        for r in rows:
            if r["name"] in BASELINES:
                ax.scatter([r["objective"]["kl"]["ALL"]], [100 * r["test"]["ALL"]], s=60, marker="*", label=r["name"])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a short log axis
        ax.set_xlabel("mean KL(base || pruned) on val, nats/token")
        ax.set_ylabel("test accuracy, all classes (%)")
        ax.set_title(f"{budget} of 16 kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(TOY))
    ap.add_argument("--recipes", type=int, default=150)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=600)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="experts kept per layer, comma list")
    ap.add_argument("--out", default="outputs/proxy_fidelity")
    ap.add_argument("--reuse", default=None, help="an earlier fidelity.json of the same seed and sizes: its rows "
                    "for the recipes this draw shares with it are taken, not recomputed")
    mode = ap.add_mutually_exclusive_group()  # instead of a run: one of these on finished runs
    mode.add_argument("--paired", action="store_true", help="only add the paired test (the objective's choice vs "
                      "REAP, frequency, gate mass, per test task) to --out's fidelity.json, with its records' sizes")
    mode.add_argument("--replot", action="store_true", help="only redraw fidelity.png from --out's fidelity.json")
    mode.add_argument("--merge", nargs="+", default=None, help="runs' --out dirs (other budgets, same recipes): "
                      "one fidelity.json, table and plot in --out")
    args = ap.parse_args()
    if args.merge:
        records, first = {}, None
        for d in args.merge:
            data = read_fidelity(Path(d))
            first = first or data["args"]
            differ = [k for k in DRAW if data["args"].get(k) != first.get(k)]
            if differ:
                raise SystemExit(f"--merge: {d} differs from {args.merge[0]} in {', '.join(differ)}: expected "
                                 "runs of one draw (same model, recipes, seed and sizes)")
            overlap = sorted(set(records) & {int(k) for k in data["records"]})
            if overlap:
                raise SystemExit(f"--merge: budget(s) {overlap} come from more than one run: expected each budget once")
            records.update({int(k): v for k, v in data["records"].items()})
        records = dict(sorted(records.items(), reverse=True))
        args = argparse.Namespace(**{**first, "budgets": ",".join(map(str, records)), "out": args.out,
                                     "merge": args.merge})  # the parts' draw, which --paired reads back
        analysis = analyse(records)
        print(report(analysis, records, args))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").write_text(json.dumps({"args": vars(args), "analysis": analysis, "records": records},
                                                      indent=1))
        plot(records, out / "fidelity.png")
        return
    if args.paired:
        path = Path(args.out) / "fidelity.json"
        data = read_fidelity(Path(args.out))
        for k in DRAW:  # the model and sizes the records were made with
            setattr(args, k, data["args"][k])
        records = {int(k): v for k, v in data["records"].items()}
        analysis = {int(k): v for k, v in data["analysis"].items()}
        for budget, pr in paired(Lab(args), records, analysis).items():
            analysis[budget]["paired"] = pr
        print(report(analysis, records, args))
        data["analysis"] = analysis
        tmp = path.with_name(".fidelity.json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
        return
    if args.replot:
        data = read_fidelity(Path(args.out))
        plot({int(k): v for k, v in data["records"].items()}, Path(args.out) / "fidelity.png")
        return
    if args.device == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    recipes = {**BASELINES, **{f"r{i:03d}": space_point(rng) for i in range(args.recipes)}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    load_partial(Path(args.out), args)  # another draw's partial file: refused before the model loads
    if args.reuse:
        reuse(Path(args.out), args, recipes)
    lab = Lab(args)
    records = evaluate(lab, recipes, [int(b) for b in args.budgets.split(",")])
    analysis = analyse(records)
    for budget, pr in paired(lab, records, analysis).items():
        analysis[budget]["paired"] = pr
    text = report(analysis, records, args)
    print(text)
    out = Path(args.out)
    (out / "fidelity.json").write_text(json.dumps({"args": vars(args), "analysis": analysis, "records": records,
                                                   "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                                   "wall_s": time.perf_counter() - t0}, indent=1))
    try:
        plot(records, out / "fidelity.png")
    except ImportError:  # a machine without matplotlib: redraw elsewhere with --replot
        print("no matplotlib: fidelity.png not drawn (--replot draws it from fidelity.json)", file=sys.stderr)
    print(f"wall {time.perf_counter() - t0:.0f} s; wrote {out / 'fidelity.json'}, {out / 'fidelity.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
