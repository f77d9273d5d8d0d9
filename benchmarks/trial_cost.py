"""What a recipe-search trial costs: the objective without generation vs generation, side by side.

On the toy model (or --model), through the CLI as a study's trial runs (virtual pruning, the
profile and the objective's reference built once beforehand): for each of --trials recipes, one run
scored by bench=divergence on the val tasks (teacher-forced, no generation) and one scored by
toy_suite on the same val tasks (greedy generation, no generation cache), alternating. Prints each
kind's median seconds: the evaluate stage alone (what a trial inside a sweep process pays beyond
its drop map) and the whole `python -m moeprune` process, and their ratio.

    python benchmarks/trial_cost.py [--trials 5] [--n-per-class 100] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

KEEPS = ("keep.experts_per_layer=12", "keep.experts_per_layer=8", "keep.experts_per_layer=6",
         "keep.experts_per_layer=4", "keep.experts_per_layer=10", "keep.experts_per_layer=7")
STRATEGIES = ("strategy=max", "strategy=reap", "strategy=frequency", "strategy=gate_mass", "strategy=mean")
KINDS = {"objective": ["bench=divergence"], "generation": ["bench=toy_suite", "bench.split=val", "evaluate.resume=false"]}


def run(args, work: Path, name: str, overrides: list[str]) -> dict:
    run_dir = work / name
    env = {**os.environ, "MOEPRUNE_CACHE": str(work / "cache"), "HYDRA_FULL_ERROR": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moeprune", f"hydra.run.dir={run_dir}", f"model.device={args.device}",
                           f"bench.n_per_class={args.n_per_class}", "evaluate.virtual=true", "stages.evaluate_base=false",
                           *([f"model.path={args.model}"] if args.model else []), *overrides],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    evaluate = json.loads((run_dir / "run.json").read_text())["stages"]["evaluate"]
    if evaluate["cached"] and not name.startswith("warmup"):  # a cache hit would time nothing
        raise SystemExit(f"{name}: its evaluation was found in {work / 'cache'}: expected a fresh --work dir")
    return {"process_s": wall, "evaluate_s": evaluate.get("wall_time_s"), "score": evaluate["score"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="default: the shipped toy model")
    ap.add_argument("--work", type=Path, default=Path("outputs/trial_cost"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for kind, extra in KINDS.items():  # warm-up: the profile and the objective's reference, not timed
        run(args, args.work, f"warmup-{kind}", [*extra, "keep.experts_per_layer=14"])
    times = {k: [] for k in KINDS}
    for i in range(args.trials):
        recipe = [KEEPS[i % len(KEEPS)], STRATEGIES[i % len(STRATEGIES)]]
        order = list(KINDS) if i % 2 == 0 else list(reversed(KINDS))  # alternate: no kind always runs first
        for kind in order:
            times[kind].append(run(args, args.work, f"{kind}-{i}", [*KINDS[kind], *recipe]))
    med = {k: {m: statistics.median(t[m] for t in v) for m in ("evaluate_s", "process_s")} for k, v in times.items()}
    print(f"device {args.device}, {args.trials} recipes, {args.n_per_class} val tasks per class "
          f"({6 * args.n_per_class} prompts)")
    print("| trial | evaluate stage (s, median) | whole process (s, median) |\n|---|---|---|")
    for k in KINDS:
        print(f"| {k} | {med[k]['evaluate_s']:.2f} | {med[k]['process_s']:.2f} |")
    ratio_e = med["generation"]["evaluate_s"] / med["objective"]["evaluate_s"]
    ratio_p = med["generation"]["process_s"] / med["objective"]["process_s"]
    print(f"generation / objective: evaluate stage {ratio_e:.2f}x, whole process {ratio_p:.2f}x")
    (args.work / "trial_cost.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "times": times, "median": med}, indent=1))


if __name__ == "__main__":
    main()
