"""Per-trial overhead of an Optuna sweep without evaluation: everything a trial costs except the
bench (Optuna ask/tell in sqlite, Hydra composing the job, the cached profile lookup, the drop map,
the run dir, the tracker).

Runs `moeprune -m hparams_search=toy_recipe stages.evaluate=false` twice with fresh studies, with
N_SHORT and N_LONG trials, after one warm-up run that caches the profile; the per-trial overhead is
(T_long - T_short) / (N_LONG - N_SHORT), so process start-up and imports cancel out. Measured for
logger=none and logger=wandb (offline). Uses the shipped toy model when present, else a tiny random
Gemma 4.

    python benchmarks/trial_overhead.py [--short 2] [--long 12] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY_MODEL = REPO / "moeprune" / "toy" / "model"


def tiny_model(path: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import save_tiny_gemma4

    return save_tiny_gemma4(path)


def moeprune(args: list[str], cwd: Path, cache: Path) -> float:
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moeprune", *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"moeprune {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--long", type=int, default=12)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="each sweep this many times; the fastest counts "
                    "(the machine is shared, so the minimum is the least disturbed)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="trial_overhead-") as tmp:
        tmp = Path(tmp)
        model = args.model or (TOY_MODEL if (TOY_MODEL / "model.safetensors").exists() else tiny_model(tmp / "tiny"))
        cache = tmp / "cache"
        fixed = [f"model.path={model}", "stages.evaluate=false", "optimized_metric=dropmap.kept_total"]
        warm = moeprune([*fixed, f"hydra.run.dir={tmp}/warm"], tmp, cache)
        print(f"model {model}\nwarm-up run (profile built): {warm:.1f} s\n")
        print("| logger | trials | wall per repeat (s) |\n|---|---|---|")
        per_trial = {}
        for seed, logger in enumerate(("none", "wandb")):
            walls = {}
            for n in (args.short, args.long):
                times = []
                for r in range(args.repeat):
                    name = f"{logger}-{n}-{r}"
                    times.append(moeprune(
                        ["-m", "hparams_search=toy_recipe", *fixed, f"logger={logger}", f"hydra.sweeper.n_trials={n}",
                         # fresh recipes per sweep, so none finds another's drop maps cached
                         f"hydra.sweeper.sampler.seed={10_000 * seed + 100 * r + n}",  # distinct for every sweep
                         "hydra.sweeper.enqueue_default=false",
                         f"hydra.sweeper.study_name={name}", f"hydra.sweeper.storage=sqlite:///{tmp}/{name}.db",
                         f"hydra.sweep.dir={tmp}/{name}"], tmp, cache))
                walls[n] = min(times)
                print(f"| {logger} | {n} | {' / '.join(f'{t:.1f}' for t in times)} |")
            per_trial[logger] = (walls[args.long] - walls[args.short]) / (args.long - args.short)
        runs = [json.loads(p.read_text())["stages"] for p in (tmp / f"none-{args.long}-0").rglob("run.json")]
        dropmap = statistics.median(r["dropmap"].get("wall_time_s", 0.0) for r in runs)
        print(f"\nper-trial overhead without eval: logger=none {per_trial['none']:.2f} s, "
              f"logger=wandb {per_trial['wandb']:.2f} s (target < 2 s); median dropmap stage {dropmap:.2f} s")


if __name__ == "__main__":
    main()
