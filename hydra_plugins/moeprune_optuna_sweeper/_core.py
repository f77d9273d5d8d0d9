"""The Optuna sweep loop: ask a batch of trials, launch them as Hydra jobs, tell their values.

Each job gets its trial number and study name as environment variables (MOEPRUNE_TRIAL,
MOEPRUNE_STUDY, through `hydra.job.env_set`) so trackers can name and group runs, and the sweeper
writes `optuna_trial.json` into each job's output dir so `moeprune report` can rebuild the study
from the files on disk.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence

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

from . import _choices, _confirm, _search_space, _split_guard, _trial_preflight, _workers
from ._returns import trial_values
from ._workers import DEFAULT_ATTR, ENQUEUED_ATTR, WORKER_ATTR, fail_stale_trials, point_pending, this_worker  # noqa: F401

log = logging.getLogger(__name__)
TRIAL_FILE = "optuna_trial.json"
DIRECTIONS = ("minimize", "maximize")
SCHEMA_RACE_RETRIES = 20
def make_storage(spec: Optional[str], heartbeat_interval: Optional[int] = None,
                 grace_period: Optional[int] = None) -> Any:
    """null -> in memory; journal:<file> -> JournalStorage; a URL -> RDBStorage, with Optuna's
    heartbeat where `heartbeat_interval` is set (a worker on another host that dies is failed after
    `grace_period` seconds without one, and its parameters retried)."""
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
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():  # "heartbeat_interval is experimental": said on every start, no use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(spec, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=_workers.retry_stale)
        except (IntegrityError, ProgrammingError) as e:
            # Workers started together on an empty database all create Optuna's tables; on PostgreSQL
            # the losers fail ("type studydirection already exists"). The winner's tables are there
            # a moment later: open them again.
            if attempt == SCHEMA_RACE_RETRIES:
                raise MoePruneError(f"hydra.sweeper.storage={spec!r}: cannot create Optuna's tables "
                                    f"({str(e).splitlines()[0]})") from None
            time.sleep(0.5)
        except (SQLAlchemyError, ImportError) as e:  # an unknown dialect, a missing driver, a server not there
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MoePruneError(f"hydra.sweeper.storage={spec!r}: cannot open it ({cause}); expected a reachable "
                                "SQLAlchemy URL (sqlite:///study.db, postgresql://user@host/db) or journal:<file>") from None


def parse_directions(direction: Any) -> list[str]:
    values = list(direction) if OmegaConf.is_list(direction) or isinstance(direction, (list, tuple)) else [direction]
    if not values or any(str(d) not in DIRECTIONS for d in values):
        raise MoePruneError(f"hydra.sweeper.direction={values}: expected minimize, maximize or a list of them")
    return [str(d) for d in values]


def _traceback(ret: JobReturn) -> Optional[str]:
    """The failed job's traceback, where it survived the trip back from the launcher."""
    e = ret._return_value
    if ret.status != JobStatus.FAILED or not isinstance(e, BaseException) or e.__traceback__ is None:
        return None
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _job_dirs(sweep_dir: Path, study: str, number: int) -> list[Path]:
    """The job dirs Hydra made for trial `number` of `study`: each job's hydra.yaml carries its
    MOEPRUNE_STUDY and MOEPRUNE_TRIAL (hydra.job.env_set)."""
    found = []
    for path in sweep_dir.glob("**/.hydra/hydra.yaml"):
        env = OmegaConf.select(OmegaConf.load(path), "hydra.job.env_set") or {}
        if str(env.get("MOEPRUNE_TRIAL")) == str(number) and str(env.get("MOEPRUNE_STUDY")) == study:
            found.append(path.parent.parent)
    return found


@contextmanager
def _heartbeats(study: optuna.Study, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """Optuna's heartbeat for each launched trial (RDB storages with heartbeat_interval set), from
    this process, which waits for the jobs: if it dies, the heartbeats stop with it."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    threads = [get_heartbeat_thread(t._trial_id, study._storage) for t in trials]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join()


class OptunaSweeperImpl(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: Any, params: Optional[DictConfig], enqueue_default: bool,
                 allow_test_split: bool = False, enqueue: Any = None, heartbeat_interval: Optional[int] = None,
                 grace_period: Optional[int] = None, confirm: Any = None) -> None:
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
        for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
            if value is not None and int(value) < 1:
                raise MoePruneError(f"hydra.sweeper.{name}={value}: expected a number of seconds >= 1, or null")
        if heartbeat_interval is not None and grace_period is not None and int(grace_period) <= int(heartbeat_interval):
            raise MoePruneError(f"hydra.sweeper.grace_period={grace_period}: expected more than heartbeat_interval="
                                f"{heartbeat_interval}, or a live trial would be failed between two heartbeats")
        self.heartbeat = (None if heartbeat_interval is None else int(heartbeat_interval),
                          None if grace_period is None else int(grace_period))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config, self.task_function = hydra_context, config, task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ---- study --------------------------------------------------------------------------------
    def _study(self) -> optuna.Study:
        kw = {"directions": self.directions} if len(self.directions) > 1 else {"direction": self.directions[0]}
        try:
            study = optuna.create_study(storage=make_storage(self.storage_spec, *self.heartbeat), study_name=self.study_name,
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
        if getattr(self.task_function, "__module__", None) == "moeprune.cli":  # moeprune's runs, not any Hydra app's
            t0 = time.monotonic()
            _trial_preflight.check(space, self.hydra_context.config_loader, self.config,
                                   Path(str(self.config.hydra.sweep.dir)))
            log.info("Run preflight of the probe trials: %.1f s", time.monotonic() - t0)
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
                study.enqueue_trial(point, user_attrs={ENQUEUED_ATTR: True}, skip_if_exists=False)
                log.info("Enqueued %s", point)

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns, completed, first_error, launched = [], 0, None, 0
        while launched < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - launched)
            if launched:  # a worker sharing the study may have died since: take over its trials first
                fail_stale_trials(study)
            trials: list = []
            try:
                for _ in range(batch):
                    trials.append(_workers.ask(study, space.distributions))
                overrides = [space.overrides(t.params) + self._env(study, t) for t in trials]
                self.validate_batch_is_legal(overrides)
                with _heartbeats(study, trials):
                    results = self.launcher.launch(overrides, initial_job_idx=self._job_idx(trials))
            except KeyboardInterrupt as e:  # SIGINT, or SIGTERM unwound as one: retried on resume
                self._interrupted(study, trials, sweep_dir, _workers.interrupt_name(e))
                raise
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
            config_error = next((e for e in (trial_values(r, len(self.directions))[1] for r in results)
                                 if e and e.startswith(f"{MoePruneError.__name__}: optimized_metric=")), None)
            if config_error:  # names a key the results lack: every later trial would run all its stages to fail so
                raise MoePruneError(f"{config_error.split(': ', 1)[1]} (the sweep stops after trial "
                                    f"{trials[-1].number}: every trial would fail the same way)")

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

    def _interrupted(self, study: optuna.Study, trials: Sequence[optuna.Trial], sweep_dir: Path, signal: str) -> None:
        """Fail the batch's trials, enqueue their parameters for the resumed sweep, and record each in
        its job dir (found by the trial number its overrides carry) as a finished trial would be."""
        why = f"interrupted by {signal}"
        for t in trials:
            if not _workers.fail_and_retry(study, study._storage.get_trial(t._trial_id), why):
                continue
            for job_dir in _job_dirs(sweep_dir, study.study_name, t.number):
                artifacts.write_json(job_dir / TRIAL_FILE, {
                    "study": study.study_name, "storage": self.storage_spec, "number": t.number, "state": "FAIL",
                    "params": t.params, "values": None, "directions": self.directions, "objectives": None,
                    "overrides": (job_dir / ".hydra" / "overrides.yaml").read_text().splitlines(),
                    "error": f"{why}; its parameters are retried when the sweep is run again",
                    "traceback": None, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

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
