"""`moeprune report --test`: a study's best trial and REAP, each scored once on the test split.

The study chose its best on the split it searched (val); this runs that recipe as an ordinary run
with `bench.split=test`, and REAP at the same keep (the trial's overrides less its swept recipe
knobs, `keep.*` kept, plus `strategy=reap`), then tabulates per class the accuracy with its 95%
Wilson interval and the paired difference vs REAP on the same tasks with the exact McNemar p.
Both runs share the study's stage cache, so the profile is not recomputed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.evaluate.bench_run import SAMPLES_FILE, read_jsonl
from moeprune.evaluate.stats import mcnemar, wilson

REAP = "REAP"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _cache_dir(job_dir: Path) -> Optional[Path]:
    """The stage cache the trial used: its artifacts are <cache>/<stage>/<key>."""
    run_json = job_dir / "run.json"
    if not run_json.is_file():
        return None
    stages = artifacts.read_json(run_json)["stages"]
    artifact = next((s["artifact"] for s in stages.values() if s.get("artifact")), None)
    return Path(artifact).parent.parent if artifact else None


def _run_overrides(trial) -> list[str]:
    """The trial's overrides as an ordinary run: no sweep (hydra.*), no split."""
    return [o for o in trial.overrides if not _key(o).startswith("hydra.") and _key(o) != "bench.split"]


def on_test(trial) -> str:
    """The command that scores a trial's recipe on test as an ordinary run (no sweep)."""
    return " ".join(["moeprune", *_run_overrides(trial), "bench.split=test"])


BASELINES = {REAP: "strategy=reap", "frequency": "strategy=frequency", "gate mass": "strategy=gate_mass"}


def commands(trial, n_test: Optional[int], confirm: Optional[dict] = None) -> dict[str, list[str]]:
    """name -> the overrides of its test run: the trial's recipe, and REAP at the trial's keep. A
    two-stage study's choice runs with its confirmation's overrides (the generating bench), against
    REAP, frequency and gate mass."""
    scored_by = [o for o in (confirm or {}).get("overrides", []) if _key(o) != "bench.split"]
    if confirm:
        scored_by.append(f"optimized_metric={confirm['metric']}")
    base = [*_run_overrides(trial), *scored_by]
    extra = ["bench.split=test", *([f"bench.n_per_class={n_test}"] if n_test else [])]
    recipe_free = [o for o in base if _key(o) not in trial.params or _key(o).startswith("keep.")]
    names = list(BASELINES) if confirm else [REAP]
    return {f"trial {trial.number}": [*base, *extra], **{n: [*recipe_free, BASELINES[n], *extra] for n in names}}


def run_on_test(overrides: list[str], run_dir: Path, cache_dir: Optional[Path]) -> dict[str, dict]:
    """{task id: sample row} of one ordinary run's evaluate stage."""
    cmd = [sys.executable, "-m", "moeprune", *overrides, f"hydra.run.dir={run_dir}",
           *([f"paths.cache_dir={cache_dir}"] if cache_dir else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    if proc.returncode != 0:
        raise MoePruneError(f"report --test: `moeprune {' '.join(overrides)}` failed (exit {proc.returncode}): "
                            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'}")
    stage = artifacts.read_json(run_dir / "run.json")["stages"]["evaluate"]
    return {r["id"]: r for r in read_jsonl(Path(stage["artifact"]) / SAMPLES_FILE)}


def table(rows: dict[str, dict[str, dict]], targets: list[str]) -> str:
    """Per class accuracy % [95% Wilson]; Δ vs REAP in points on the same tasks (exact McNemar p)."""
    ref = rows[REAP]
    classes = sorted({r["category"] for r in ref.values()})
    head = ["recipe", *classes, "ALL", *(f"Δ {c} vs {REAP} (p)" for c in ["ALL", *targets])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, tasks in rows.items():
        if set(tasks) != set(ref):
            raise MoePruneError(f"report --test: {name} and {REAP} scored different tasks; expected the same test set")
        cells = []
        for c in [*classes, "ALL"]:
            ids = [i for i, r in tasks.items() if c == "ALL" or r["category"] == c]
            k = sum(bool(tasks[i]["pass"]) for i in ids)
            lo, hi = wilson(k, len(ids))
            cells.append(f"{100 * k / len(ids):.1f} [{100 * lo:.0f}, {100 * hi:.0f}]")
        for c in ["ALL", *targets]:
            ids = [i for i, r in tasks.items() if c == "ALL" or r["category"] == c]
            d, p = mcnemar({i: bool(tasks[i]["pass"]) for i in ids}, {i: bool(ref[i]["pass"]) for i in ids})
            cells.append(f"{100 * d:+.1f} (p={p:.2g})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_of(objectives: list[str]) -> list[str]:
    """The classes a study's objectives single out (evaluate.per_category.<c>, evaluate.others_mean.<c>)."""
    out = []
    for o in objectives:
        parts = o.split(".")
        if len(parts) == 3 and parts[1] in ("per_category", "others_mean") and parts[2] not in out:
            out.append(parts[2])
    return out


def holdout_table(trial, out_dir: Path, n_test: Optional[int] = None, confirm: Optional[dict] = None) -> str:
    run_json = trial.job_dir / "run.json"
    scored = artifacts.read_json(run_json)["stages"].get("evaluate", {}) if run_json.is_file() else {}
    if confirm is None and scored.get("metric"):  # before any test run is paid for
        raise MoePruneError(f"report --test: trial {trial.number} was scored by bench={scored.get('bench')} "
                            f"({scored['metric']}, teacher-forced), which passes or fails no task to compare on "
                            "test: expected a two-stage study (hydra.sweeper.confirm.top >= 1, whose generating "
                            "bench scores the test runs) or a study on a generating bench")
    cache = _cache_dir(trial.job_dir)
    rows = {name: run_on_test(overrides, out_dir / name.replace(" ", "-"), cache)
            for name, overrides in commands(trial, n_test, confirm).items()}
    targets = targets_of([confirm["metric"]] if confirm else trial.objectives) or targets_of(trial.objectives)
    out = table(rows, targets)
    if confirm:
        out += "\n\n" + versus(rows, f"trial {trial.number}", targets)
    return out


def versus(rows: dict[str, dict[str, dict]], chosen: str, targets: list[str]) -> str:
    """The chosen recipe against each baseline on the same test tasks: Δ points (exact McNemar p)."""
    head = ["vs", *(f"Δ {c} (p)" for c in ["ALL", *targets])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mine = rows[chosen]
    for name in (n for n in rows if n != chosen):
        cells = []
        for c in ["ALL", *targets]:
            ids = [i for i, r in mine.items() if c == "ALL" or r["category"] == c]
            d, p = mcnemar({i: bool(mine[i]["pass"]) for i in ids}, {i: bool(rows[name][i]["pass"]) for i in ids})
            cells.append(f"{100 * d:+.1f} (p={p:.2g})")
        lines.append(f"| {chosen} vs {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
