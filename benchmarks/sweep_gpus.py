"""A recipe sweep spread over the GPUs of one host (hydra/launcher=joblib_gpus), checked from its
own files, and timed against the same trials run one at a time.

    python benchmarks/sweep_gpus.py --jobs 2 [--trials 6] [--n-per-class 50] [--out DIR]

Runs a plain run first to cache the profile and the base eval, copies that cache for each sweep,
then runs `moeprune -m hparams_search=toy_recipe hydra/launcher=joblib_gpus` with n_jobs=--jobs
(one job per visible GPU; with fewer GPUs than jobs they share round-robin) and again with n_jobs=1
(same seed: the same trials). Prints each job's CUDA_VISIBLE_DEVICES and pid (gpu_slot.json and the
job's own log line), how many jobs ran at once, whether the study holds every trial exactly once,
and the wall-time ratio. Extra arguments go to both sweeps (e.g. model.path=...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def moeprune(args: list[str], cwd: Path, cache: Path) -> float:
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moeprune", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"moeprune {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def jobs_of(sweep_dir: Path) -> list[dict]:
    out = []
    for rec_path in sorted(sweep_dir.rglob("optuna_trial.json"), key=lambda p: int(p.parent.name)):
        rec = json.loads(rec_path.read_text())
        slot_path = rec_path.parent / "gpu_slot.json"
        slot = json.loads(slot_path.read_text()) if slot_path.exists() else {}
        log = "".join(p.read_text() for p in rec_path.parent.glob("*.log"))
        line = next((ln.split(" - ", 1)[-1] for ln in log.splitlines() if "gpu slot" in ln), "-")
        out.append({"trial": rec["number"], "state": rec["state"], "values": rec["values"], "params": rec["params"],
                    **{k: slot.get(k) for k in ("pid", "slot", "CUDA_VISIBLE_DEVICES", "start", "end")}, "log": line})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, required=True, help="parallel jobs (= GPUs for one job per GPU)")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("outputs/sweep_gpus"))
    ap.add_argument("--pretend-devices", default=None, help="e.g. 0,1: hand these ids out as if they were GPUs "
                    "(exercises the assignment on a machine without any)")
    ap.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. model.path=DIR")
    args = ap.parse_args()

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fixed = [f"bench.n_per_class={args.n_per_class}", *args.overrides]
    warm = moeprune(["hparams_search=toy_recipe", *fixed, f"hydra.run.dir={out}/warm"], out, out / "cache")
    print(f"warm-up (profile + base eval + default recipe): {warm:.1f} s")

    walls, runs = {}, {}
    for n_jobs in (args.jobs, 1):
        name = f"jobs{n_jobs}"
        shutil.copytree(out / "cache", out / f"cache-{name}")
        walls[n_jobs] = moeprune(
            ["-m", "hparams_search=toy_recipe", *fixed, "hydra/launcher=joblib_gpus",
             f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweeper.n_trials={args.trials}",
             *([f"hydra.callbacks.gpu_slots.devices=[{args.pretend_devices}]"] if args.pretend_devices else []),
             "hydra.sweeper.enqueue_default=false",  # trial 0 would be the cached default: all trials do work
             f"hydra.sweeper.storage=journal:{out}/{name}.journal", f"hydra.sweep.dir={out}/{name}"],
            out, out / f"cache-{name}")
        runs[n_jobs] = jobs_of(out / name)

    par = runs[args.jobs]
    print(f"\nn_jobs={args.jobs}: {len(par)} trials, parent CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}")
    print("| trial | state | score | pid | slot | CUDA_VISIBLE_DEVICES | start (s) | end (s) | job log |")
    print("|---|---|---|---|---|---|---|---|---|")
    t0 = min(j["start"] for j in par)
    for j in par:
        score = j["values"][0] if j["values"] else None
        print(f"| {j['trial']} | {j['state']} | {score} | {j['pid']} | {j['slot']} | {j['CUDA_VISIBLE_DEVICES']} | "
              f"{j['start'] - t0:.1f} | {j['end'] - t0:.1f} | {j['log']} |")
    numbers = [j["trial"] for j in par]
    same = [j["params"] for j in par] == [j["params"] for j in runs[1]]
    summary = {
        "jobs": args.jobs, "trials": args.trials,
        "devices_seen": sorted({j["CUDA_VISIBLE_DEVICES"] for j in par}, key=str),
        "pids": len({j["pid"] for j in par}),
        "max_jobs_at_once": max_concurrency([(j["start"], j["end"]) for j in par]),
        "study_trials_unique_and_complete": sorted(numbers) == list(range(args.trials)),
        "same_trials_as_sequential": same,
        "same_scores_as_sequential": [j["values"] for j in par] == [j["values"] for j in runs[1]],
        "wall_parallel_s": round(walls[args.jobs], 1), "wall_sequential_s": round(walls[1], 1),
        "speedup": round(walls[1] / walls[args.jobs], 2),
    }
    print(json.dumps(summary, indent=1))
    (out / "summary.json").write_text(json.dumps({"summary": summary, "parallel": par, "sequential": runs[1]}, indent=1))


if __name__ == "__main__":
    main()
