"""The second stage of a two-stage study: re-score the study's best trials by generation on val.

A study optimizes a cheap objective (bench=divergence: one teacher-forced pass per trial) over many
trials; a cheap objective ranks well but not perfectly (docs/objective.md), so its best
`confirm.top` trials (a multi-objective study: its Pareto front) run again with `confirm.overrides`
(a generating bench on its val split) and the best of those by `confirm.metric` is the study's
choice. Written to `confirm.json` in the sweep dir, which `moeprune report` reads; `moeprune report
--test` then scores that choice once on test.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from omegaconf import OmegaConf

from moeprune import artifacts
from moeprune.errors import MoePruneError

from ._returns import trial_values
from ._split_guard import KEY, REPORTED

log = logging.getLogger(__name__)
CONFIRM_FILE = "confirm.json"
DIRECTIONS = ("minimize", "maximize")


def check(confirm: Any, config_loader, config, fixed: list[str]) -> Optional[dict]:
    """The confirm section as a dict, or None for a one-stage study. Its runs must compose, and must
    not choose on the split reported tables score: said before the study is created."""
    c = OmegaConf.to_container(confirm) if OmegaConf.is_config(confirm) else dict(confirm or {})
    if not c or not int(c.get("top") or 0):
        return None
    if int(c["top"]) < 0 or str(c.get("direction")) not in DIRECTIONS or not c.get("overrides"):
        raise MoePruneError(f"hydra.sweeper.confirm={c}: expected top >= 1, direction in {DIRECTIONS} and the "
                            "overrides of the confirmation runs (e.g. [bench=toy_suite, bench.split=val])")
    overrides = [str(o) for o in c["overrides"]] + [f"optimized_metric={c['metric']}"]
    try:
        composed = config_loader.load_sweep_config(config, [*fixed, *overrides])
    except Exception as e:  # a missing preset, a foreign knob: Hydra's own words, on one line
        raise MoePruneError(f"hydra.sweeper.confirm.overrides={c['overrides']}: {str(e).splitlines()[0]}") from None
    split = OmegaConf.select(composed, KEY)
    if split is None or str(split) in REPORTED:
        raise MoePruneError(f"hydra.sweeper.confirm.overrides: the confirmation runs would score {KEY}={split}, which "
                            f"holds the split reported tables score: expected {KEY}=val among them")
    return {**c, "overrides": [str(o) for o in c["overrides"]], "top": int(c["top"])}


def candidates(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The trials to confirm: the best `top` by value, or the Pareto front best first by the first
    objective (then the second), cut to `top`."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in study.directions]
    pool = study.best_trials if len(signs) > 1 else done
    ranked = sorted(pool, key=lambda t: (tuple(-s * v for s, v in zip(signs, t.values)), t.number))
    return ranked[:top]


def run(sweeper, study: optuna.Study, confirm: dict, sweep_dir: Path) -> dict:
    """Launch the confirmation runs, pick the best, write confirm.json; returns what it wrote."""
    picked = candidates(study, confirm["top"])
    metric, direction = str(confirm["metric"]), str(confirm["direction"])
    jobs = [sweeper.space.overrides(t.params) + confirm["overrides"] + [
        f"optimized_metric={metric}", f"hydra.sweep.subdir=confirm-{t.number}",
        f"++hydra.job.env_set.MOEPRUNE_TRIAL={t.number}"] for t in picked]
    log.info("Confirming trials %s with %s (%s %s)", [t.number for t in picked], confirm["overrides"], direction,
             metric)
    sweeper.validate_batch_is_legal(jobs)
    results = sweeper.launcher.launch(jobs, initial_job_idx=0)
    rows = []
    for t, ret in zip(picked, results):
        values, error = trial_values(ret, 1)
        job_dir = str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None
        rows.append({"trial": t.number, "params": t.params, "values": t.values, "confirm_value": values[0] if values
                     else None, "error": error, "job_dir": job_dir, "overrides": list(ret.overrides or [])})
    scored = [r for r in rows if r["confirm_value"] is not None]
    if not scored:
        raise MoePruneError(f"none of the {len(rows)} confirmation runs completed; first failure: {rows[0]['error']}")
    sign = 1 if direction == "maximize" else -1
    chosen = max(scored, key=lambda r: (sign * r["confirm_value"], -rows.index(r)))  # ties: the study's order
    record = {"study": study.study_name, "metric": metric, "direction": direction, "overrides": confirm["overrides"],
              "candidates": rows, "chosen": chosen["trial"], "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    artifacts.write_json(sweep_dir / CONFIRM_FILE, record)
    # in the study too (a finished trial takes no new attrs), for workers and reports reading the storage
    study.set_user_attr("confirm", {"metric": metric, "chosen": chosen["trial"],
                                    "values": {str(r["trial"]): r["confirm_value"] for r in rows}})
    log.info("Confirmed: trial %d scores %s=%.6g (of %s)", chosen["trial"], metric, chosen["confirm_value"],
             [(r["trial"], r["confirm_value"]) for r in rows])
    return record
