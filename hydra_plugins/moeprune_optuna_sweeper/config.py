"""Config schema of the moeprune Optuna sweeper, registered as `hydra/sweeper=optuna`.

The shape follows the official hydra-optuna-sweeper (sampler, direction, storage, study_name,
n_trials, n_jobs, params), which cannot be used here: it pins optuna<3, whose sqlite storage fails
with SQLAlchemy 2. This module is imported by Hydra's plugin scan on every start, so it imports
nothing heavy (optuna is imported only when a sweep runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = 123
    n_startup_trials: int = 10
    multivariate: bool = False
    group: bool = False
    constant_liar: bool = False  # True helps parallel (n_jobs > 1) batches spread out


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = 123


@dataclass
class NSGAIISamplerConf:  # multi-objective (Pareto front)
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: Optional[int] = 123
    population_size: int = 50
    mutation_prob: Optional[float] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class BruteForceSamplerConf:  # small all-discrete spaces: every combination once
    _target_: str = "optuna.samplers.BruteForceSampler"
    seed: Optional[int] = 123


@dataclass
class ConfirmConf:
    """The second stage of a two-stage study (docs/sweeps.md): after the trials, the best `top` of
    them (a multi-objective study: its Pareto front, best first by the first objective) are run
    again with `overrides` (a generating bench on its val split) and scored by `metric`; the best
    confirmed trial is the study's choice (confirm.json in the sweep dir, `moeprune report`)."""

    top: int = 0  # 0: one stage, the study's own best is its choice
    overrides: List[str] = field(default_factory=list)  # e.g. [bench=toy_suite, bench.split=val]
    metric: str = "evaluate.score"  # the confirmation runs' optimized_metric
    direction: str = "maximize"


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.moeprune_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # The sampler is built by the sweeper (not by Hydra) so that a resumed study can reseed it.
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])

    sampler: Any = MISSING
    # minimize | maximize, or a list of them (one per value the task returns): multi-objective.
    direction: Any = "minimize"
    # null: in memory (lost at exit); an SQLAlchemy URL (sqlite:///study.db, postgresql://...);
    # or journal:<file> (Optuna's JournalStorage: one append-only file, no database).
    storage: Optional[str] = None
    # The name a rerun uses to find and continue the study in `storage`.
    study_name: Optional[str] = None
    # Trials this invocation runs; a rerun against the same storage adds as many again.
    n_trials: int = 20
    # Trials asked and launched together: match the launcher's parallelism.
    n_jobs: Any = "${oc.select:hydra.launcher.n_jobs,1}"
    # key -> override syntax: choice(a,b) | a,b | range(lo,hi[,step]) (hi included) |
    # interval(lo,hi) | int(interval(lo,hi)) | tag(log, interval(lo,hi)) | a fixed value.
    params: Optional[Dict[str, str]] = None
    # Ask the config's own values of the swept keys first (trial 0 of a new study): the sweep
    # then starts from the default recipe and its best can only match or beat it.
    enqueue_default: bool = False
    # Points of the space a new study scores first (after the default), each {swept key: value}
    # (keys left out are sampled): e.g. the baselines a recipe search nests, so its best can only
    # match or beat them. A rerun enqueues a point again until it has a complete trial.
    enqueue: Optional[List[Dict[str, Any]]] = None
    # A sweep whose objective reads the bench refuses to optimize on its test split (bench.split=test,
    # or null where the bench's default is test) unless this is set: tables report test.
    allow_test_split: bool = False
    # RDB storages (postgresql://, sqlite:///): each running trial's sweeper records a heartbeat every
    # heartbeat_interval s; a trial without one for grace_period s (its worker died, on any host) is
    # failed by the next worker that asks, and its parameters retried. null turns heartbeats off.
    heartbeat_interval: Optional[int] = 60
    grace_period: Optional[int] = 180
    confirm: ConfirmConf = field(default_factory=ConfirmConf)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="moeprune_optuna_sweeper")
    for name, node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf), ("nsgaii", NSGAIISamplerConf),
                       ("bruteforce", BruteForceSamplerConf)):
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="moeprune_optuna_sweeper")


register()
