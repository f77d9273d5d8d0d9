"""The Optuna sweep loop: ask a batch of trials, launch them as Hydra jobs, tell their values.

Each job gets its trial number and study name as environment variables (MOEPRUNE_TRIAL,
MOEPRUNE_STUDY, through `hydra.job.env_set`) so trackers can name and group runs, and the sweeper
writes `optuna_trial.json` into each job's output dir so `moeprune report` can rebuild the study
from the files on disk.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, List, Optional, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moeprune import artifacts
from moeprune.errors import MoePruneError

from . import _choices, _confirm, _search_space, _split_guard

log = logging.getLogger(__name__)
TRIAL_FILE = "optuna_trial.json"
DIRECTIONS = ("minimize", "maximize")
DEFAULT_ATTR = "default_recipe"  # user attr of the trial enqueued with the config's own values
WORKER_ATTR = "worker"  # user attr: {host, pid, started} of the process that asked the trial


def _started(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), which a
    reused pid does not share; None where /proc cannot tell (the process is gone, or no /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid())}


def worker_is_dead(worker: Any) -> bool:
    """True only when the trial's process is known to be gone: same host, and its pid is no longer
    that process. A trial of another host, or one asked before workers were recorded, may belong
    to a live sweeper sharing the study: it is left alone."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return worker.get("started") is not None and _started(int(worker["pid"])) != worker["started"]


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose process died (a SIGKILL, a lost node) and enqueue their
    parameters again, so the resumed sweep retries them first. Returns the failed trial numbers."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        if not worker_is_dead(worker):
            if worker is None or worker.get("host") != socket.gethostname():
                log.warning("trial %d is RUNNING, asked by %s: left alone (it may be a live sweeper's)",
                            t.number, worker or "an unrecorded process")
            continue
        why = f"left RUNNING by a process that died (pid {worker['pid']} on {worker['host']}); parameters retried"
        study._storage.set_trial_user_attr(t._trial_id, "error", why)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        retry = {"retry_of": t.number, **({DEFAULT_ATTR: True} if t.user_attrs.get(DEFAULT_ATTR) else {})}
        study.enqueue_trial(t.params, user_attrs=retry, skip_if_exists=False)
        log.warning("trial %d: %s", t.number, why)
        failed.append(t.number)
    return failed


def point_pending(study: optuna.Study, point: dict, marker: Optional[str] = None) -> bool:
    """Whether an enqueued point (every swept key, or some) has a complete trial, or one waiting or
    running to become one; with `marker`, a trial carrying that user attr counts as the point."""
    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    return any((marker and t.user_attrs.get(marker)) or t.system_attrs.get("fixed_params") == point
               or {k: t.params.get(k) for k in point} == point
               for t in study.get_trials(deepcopy=False, states=live))


def make_storage(spec: Optional[str]) -> Any:
    """null -> in memory; journal:<file> -> JournalStorage; a URL -> RDBStorage."""
    if spec is None:
        return None
    spec = str(spec)
    if spec.startswith("journal:"):
        path = Path(spec[len("journal:"):]).expanduser()
        if not path.name:
            raise MoePruneError(f"hydra.sweeper.storage={spec!r}: expected journal:<file path>")
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in spec:
        raise MoePruneError(f"hydra.sweeper.storage={spec!r}: expected null (in memory), an SQLAlchemy URL "
                            "(sqlite:///study.db, postgresql://user@host/db) or journal:<file>")
    engine_kwargs = {}
    if spec.startswith("sqlite:///"):
        Path(spec[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several sweepers on one file wait, not fail
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return optuna.storages.RDBStorage(spec, engine_kwargs=engine_kwargs)
    except (SQLAlchemyError, ImportError) as e:  # an unknown dialect, a missing driver, a server not there
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MoePruneError(f"hydra.sweeper.storage={spec!r}: cannot open it ({cause}); expected a reachable "
                            "SQLAlchemy URL (sqlite:///study.db, postgresql://user@host/db) or journal:<file>") from None


def parse_directions(direction: Any) -> list[str]:
    values = list(direction) if OmegaConf.is_list(direction) or isinstance(direction, (list, tuple)) else [direction]
    if not values or any(str(d) not in DIRECTIONS for d in values):
        raise MoePruneError(f"hydra.sweeper.direction={values}: expected minimize, maximize or a list of them")
    return [str(d) for d in values]


def trial_values(ret: JobReturn, n: int) -> tuple[Optional[list[float]], Optional[str]]:
    """(values, None) for a usable return, (None, why) otherwise."""
    if ret.status != JobStatus.COMPLETED:
        return None, f"{type(ret._return_value).__name__}: {ret._return_value}"
    value = ret._return_value
    raw = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    if len(raw) != n or any(v is None for v in raw):
        return None, (f"the task returned {value!r}; expected {n} number(s), one per direction "
                      "(check optimized_metric names values this run produces)")
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError):
        return None, f"the task returned {value!r}, which is not numeric"
    if not all(math.isfinite(v) for v in values):
        return None, f"the task returned a non-finite value {values}"
    return values, None


def _traceback(ret: JobReturn) -> Optional[str]:
    """The failed job's traceback, where it survived the trip back from the launcher."""
    e = ret._return_value
    if ret.status != JobStatus.FAILED or not isinstance(e, BaseException) or e.__traceback__ is None:
        return None
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


class OptunaSweeperImpl(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: Any, params: Optional[DictConfig], enqueue_default: bool,
                 allow_test_split: bool = False, enqueue: Any = None, confirm: Any = None) -> None:
        self.sampler_cfg = sampler
        self.confirm = confirm
        self.directions = parse_directions(direction)
        self.storage_spec = storage
        self.study_name = study_name
        if int(n_trials) < 1:
            raise MoePruneError(f"hydra.sweeper.n_trials={n_trials}: expected at least 1")
        self.n_trials = int(n_trials)
        n_jobs = int(n_jobs)
        if n_jobs == -1:  # joblib's "all CPUs"
            import os

            n_jobs = os.cpu_count() or 1
        if n_jobs < 1:
            raise MoePruneError(f"hydra.sweeper.n_jobs={n_jobs}: expected at least 1")
        self.n_jobs = n_jobs
        self.params = {str(k): v for k, v in (params or {}).items()}
        self.enqueue_default = bool(enqueue_default)
        self.allow_test_split = bool(allow_test_split)
        points = OmegaConf.to_container(enqueue) if OmegaConf.is_config(enqueue) else enqueue
        if points is not None and not isinstance(points, list):
            raise MoePruneError(f"hydra.sweeper.enqueue={points!r}: expected a list of {{swept key: value}} points")
        self.enqueue = points or []

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ---- study --------------------------------------------------------------------------------
    def _study(self) -> optuna.Study:
        kw = {"directions": self.directions} if len(self.directions) > 1 else {"direction": self.directions[0]}
        try:
            study = optuna.create_study(storage=make_storage(self.storage_spec), study_name=self.study_name,
                                        load_if_exists=True, **kw)
        except ValueError as e:  # e.g. an existing study with other directions
            raise MoePruneError(f"study {self.study_name!r} in {self.storage_spec}: {e}") from None
        have = [d.name.lower() for d in study.directions]
        if have != self.directions:
            raise MoePruneError(f"study {study.study_name!r} in {self.storage_spec} optimizes {have}; the config "
                                f"asks {self.directions}: use another study_name or storage")
        # Reseed from (seed, trials so far): a rerun continues the study with new suggestions rather
        # than replaying the first run's, and stays reproducible.
        done = len(study.get_trials(deepcopy=False))
        kwargs = {}
        if "seed" in self.sampler_cfg and self.sampler_cfg.seed is not None:
            kwargs["seed"] = int(self.sampler_cfg.seed) + done
        study.sampler = instantiate(self.sampler_cfg, **kwargs)
        log.info("Study %s (%d trials so far), storage %s, sampler %s, directions %s",
                 study.study_name, done, self.storage_spec or "in memory", type(study.sampler).__name__,
                 self.directions)
        return study

    def sweep(self, arguments: List[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        space = _search_space.build(parser.parse_overrides(lines))
        if not space.distributions:
            raise MoePruneError("the Optuna sweeper has nothing to search: set hydra.sweeper.params or pass "
                                "sweep overrides such as strategy.alpha='interval(0.5,4)'")
        # Mistakes of the space are said before the study is created: none leaves an empty study behind.
        _split_guard.check(self.config, space, self.allow_test_split)
        _choices.check(space, self.hydra_context.config_loader, self.config)
        confirm = _confirm.check(self.confirm, self.hydra_context.config_loader, self.config, space.fixed)
        self.space = space
        points = _search_space.enqueued_points(space, self.enqueue)
        default = None
        if self.enqueue_default:
            choices = OmegaConf.to_container(self.config.hydra.runtime.choices)
            default = _search_space.default_params(space, self.config, choices)
        study = self._study()
        log.info("Search space: %s", {k: repr(d) for k, d in space.distributions.items()})
        fail_stale_trials(study)
        if default is not None:
            # Until the default recipe has a complete trial (a kill, a crash), every run enqueues it.
            if not point_pending(study, default, DEFAULT_ATTR):
                study.enqueue_trial(default, user_attrs={DEFAULT_ATTR: True}, skip_if_exists=False)
        for point in points:
            if not point_pending(study, point):
                study.enqueue_trial(point, user_attrs={"enqueued": True}, skip_if_exists=False)
                log.info("Enqueued %s", point)

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns, completed, first_error, launched = [], 0, None, 0
        while launched < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - launched)
            trials = [study.ask(fixed_distributions=space.distributions) for _ in range(batch)]
            for t in trials:  # so a later run can tell this process's trials from a live one's
                t.set_user_attr(WORKER_ATTR, this_worker())
            overrides = [space.overrides(t.params) + self._env(study, t) for t in trials]
            try:
                self.validate_batch_is_legal(overrides)
                results = self.launcher.launch(overrides, initial_job_idx=self._job_idx(trials))
            except BaseException:
                for t in trials:  # leave no RUNNING trial behind for the next rerun to trip on
                    study.tell(t, state=optuna.trial.TrialState.FAIL)
                raise
            for trial, ret in zip(trials, results):
                values, error = trial_values(ret, len(self.directions))
                if values is None:
                    log.warning("trial %d failed: %s", trial.number, error)
                    trial.set_user_attr("error", error)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    first_error = first_error or error
                else:
                    study.tell(trial, values)
                    completed += 1
                self._record(study, trial, ret, values, error)
            returns.append(results)
            launched += batch

        if completed == 0:
            raise MoePruneError(f"none of the {self.n_trials} trials of this sweep completed; first failure: {first_error}")
        self._save_results(study, sweep_dir)
        if confirm:  # the second stage: the best trials re-scored by generation on val
            _confirm.run(self, study, confirm, sweep_dir)
        return returns

    # ---- records ------------------------------------------------------------------------------
    @staticmethod
    def _job_idx(trials: Sequence[optuna.Trial]) -> int:
        """Job numbers (and so the default job subdirs) are the trial numbers: a rerun of the same
        command into the same sweep dir adds dirs instead of overwriting the first run's. Another
        process asking from the same study in between breaks the run of numbers; its jobs then keep
        the launch order, and optuna_trial.json in each job dir still names the trial."""
        first = trials[0].number
        if [t.number for t in trials] != list(range(first, first + len(trials))):
            log.warning("trials %s are not consecutive (another worker shares the study): job numbers follow "
                        "the batch order from %d", [t.number for t in trials], first)
        return first

    @staticmethod
    def _env(study: optuna.Study, trial: optuna.Trial) -> list[str]:
        return [f"++hydra.job.env_set.MOEPRUNE_TRIAL={trial.number}",
                f"++hydra.job.env_set.MOEPRUNE_STUDY='{study.study_name}'"]

    def _record(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn, values, error) -> None:
        if ret.hydra_cfg is None:
            return
        job_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
        artifacts.write_json(job_dir / TRIAL_FILE, {
            "study": study.study_name,
            "storage": self.storage_spec,
            "number": trial.number,
            "state": "COMPLETE" if values is not None else "FAIL",
            "params": trial.params,
            "values": values,
            "directions": self.directions,
            "objectives": self._objective_names(ret),
            "overrides": list(ret.overrides or []),
            "error": error,
            "traceback": _traceback(ret),
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    @staticmethod
    def _objective_names(ret: JobReturn) -> list[str] | None:
        metric = OmegaConf.select(ret.cfg, "optimized_metric") if ret.cfg is not None else None
        if metric is None:
            return None
        return [str(m) for m in metric] if OmegaConf.is_list(metric) else [str(metric)]

    def _save_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        out: dict[str, Any] = {"name": "optuna", "study": study.study_name, "directions": self.directions,
                               "n_trials_in_study": len(study.trials)}
        if len(self.directions) == 1:
            best = study.best_trial
            out.update(best_trial=best.number, best_params=best.params, best_value=best.value)
            log.info("Best trial %d: value %.6g, params %s", best.number, best.value, best.params)
        else:
            out["solutions"] = [{"trial": t.number, "params": t.params, "values": t.values} for t in study.best_trials]
            log.info("Pareto front: %d trials", len(out["solutions"]))
        OmegaConf.save(OmegaConf.create(out), sweep_dir / "optimization_results.yaml")
