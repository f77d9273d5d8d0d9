"""Which process holds which trial, and what becomes of a trial whose process is gone.

A trial is recorded with the process that asked it (host, pid, start time) before anything can
interrupt the ask: a sweeper killed inside `ask` (SIGKILL, SIGTERM, SIGINT) leaves a RUNNING trial
that the next sweeper on the host can prove dead, fail, and retry with the parameters it was meant to
run (an enqueued point's full fixed parameters, not the few sampled before the kill). Across hosts
the proof is Optuna's heartbeat (RDB storages): a trial whose heartbeat stopped for `grace_period`
is failed by whichever worker looks next, and the same retry runs as its `heartbeat_stale_trial_callback`.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)
DEFAULT_ATTR = "default_recipe"  # user attr of the trial enqueued with the config's own values
ENQUEUED_ATTR = "enqueued"  # user attr of a `hydra.sweeper.enqueue` point
WORKER_ATTR = "worker"  # user attr: {host, pid, started} of the process that asked the trial
RETRY_ATTR = "retry_of"  # user attr: the number of the failed trial whose parameters this one reruns
_left_alone: set[int] = set()  # trials already reported as someone else's: said once per process


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
    to a live sweeper sharing the study: it is left alone (heartbeats cover other hosts)."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return worker.get("started") is not None and _started(int(worker["pid"])) != worker["started"]


def planned_params(trial: FrozenTrial) -> dict:
    """The parameters the trial was to run: the ones it drew, and every fixed one of an enqueued point
    (a trial interrupted inside `ask` holds only some)."""
    return {**trial.params, **trial.system_attrs.get("fixed_params", {})}


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed trial's parameters again, keeping what it stood for (the default recipe, an
    enqueued point), so the point is still scored once."""
    marks = {k: True for k in (DEFAULT_ATTR, ENQUEUED_ATTR) if trial.user_attrs.get(k)}
    study.enqueue_trial(planned_params(trial), user_attrs={RETRY_ATTR: trial.number, **marks}, skip_if_exists=False)


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, why: str) -> bool:
    """Fail a RUNNING trial and retry its parameters; False where another worker finished it first
    (the state change is atomic in the storage, so only one retry is ever enqueued)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "error", why)  # before: a finished trial takes no attrs
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    retry(study, storage.get_trial(trial._trial_id))
    log.warning("trial %d: %s; parameters retried", trial.number, why)
    return True


def retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """`heartbeat_stale_trial_callback` of an RDB storage: Optuna's heartbeat check has just failed `trial`."""
    worker = trial.user_attrs.get(WORKER_ATTR) or {}
    log.warning("trial %d: no heartbeat from %s for the grace period: failed, parameters retried",
                trial.number, f"pid {worker.get('pid')} on {worker.get('host')}" if worker else "its worker")
    retry(study, trial)


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose process died (a kill, a lost node) and enqueue their parameters
    again, so they are retried first. Returns the trial numbers this call failed. Run before every
    batch, so live workers sharing a study take over a dead one's trial."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    if is_heartbeat_enabled(study._storage):  # another host's worker: its heartbeat stopped
        with warnings.catch_warnings():  # "experimental since 2.9": noise in every batch's log
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    failed = sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        if worker_is_dead(worker):
            why = f"left RUNNING by a process that died (pid {worker['pid']} on {worker['host']})"
            if fail_and_retry(study, t, why):
                failed.append(t.number)
        elif t.number not in _left_alone and (worker is None or worker.get("host") != socket.gethostname()):
            _left_alone.add(t.number)
            log.warning("trial %d is RUNNING, asked by %s: left alone (it may be a live sweeper's%s)", t.number,
                        worker or "an unrecorded process",
                        "; its heartbeat decides" if is_heartbeat_enabled(study._storage) else "")
    return failed


def point_pending(study: optuna.Study, point: dict, marker: Optional[str] = None) -> bool:
    """Whether an enqueued point (every swept key, or some) has a complete trial, or one waiting or
    running to become one; with `marker`, a trial carrying that user attr counts as the point."""
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    return any((marker and t.user_attrs.get(marker)) or t.system_attrs.get("fixed_params") == point
               or {k: t.params.get(k) for k in point} == point
               for t in study.get_trials(deepcopy=False, states=live))


def _duplicate_of(study: optuna.Study, trial: FrozenTrial) -> Optional[int]:
    """An earlier live trial of the same enqueued point: workers starting together may each enqueue
    the default recipe (or a listed point) before seeing the others'; the first one is scored."""
    if trial.user_attrs.get(RETRY_ATTR) is not None:
        return None
    point = trial.system_attrs.get("fixed_params")
    if trial.user_attrs.get(DEFAULT_ATTR):
        same = lambda u: u.user_attrs.get(DEFAULT_ATTR)  # noqa: E731
    elif trial.user_attrs.get(ENQUEUED_ATTR) and point is not None:
        same = lambda u: u.system_attrs.get("fixed_params") == point  # noqa: E731
    else:
        return None
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    earlier = [u.number for u in study.get_trials(deepcopy=False, states=live) if u.number < trial.number and same(u)]
    return earlier[0] if earlier else None


def _claim_waiting(study: optuna.Study, me: dict) -> Optional[int]:
    """Study._pop_waiting_trial_id, with the worker written on the trial before it turns RUNNING."""
    storage = study._storage
    for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            storage.set_trial_user_attr(t._trial_id, WORKER_ATTR, me)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue  # another worker took it (and rewrites the worker attr next)
            storage.set_trial_user_attr(t._trial_id, WORKER_ATTR, me)
        except UpdateFinishedTrialError:
            continue
        claimed = storage.get_trial(t._trial_id)
        dup = _duplicate_of(study, claimed)
        if dup is None:
            return t._trial_id
        storage.set_trial_user_attr(t._trial_id, "duplicate_of", dup)
        storage.set_trial_state_values(t._trial_id, state=TrialState.PRUNED)
        log.info("trial %d: the same enqueued point as trial %d, not run twice (PRUNED)", t.number, dup)
    return None


def _new_running(me: dict) -> FrozenTrial:
    return FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None, datetime_start=datetime.now(),
                       datetime_complete=None, params={}, distributions={}, user_attrs={WORKER_ATTR: me},
                       system_attrs={}, intermediate_values={}, trial_id=-1)


def ask(study: optuna.Study, distributions: Mapping[str, BaseDistribution]) -> optuna.Trial:
    """`study.ask(fixed_distributions=...)`, with the asking process recorded atomically with the
    trial (a new trial is created with it; a queued one gets it before it turns RUNNING) and a first
    heartbeat recorded (Optuna never fails a RUNNING trial that has none). An interrupt inside the
    ask fails the trial and retries its parameters."""
    me = this_worker()
    if hasattr(study, "_thread_local"):  # as Study.ask: the samplers read the trials afresh
        study._thread_local.cached_all_trials = None
    storage = study._storage
    trial_id = _claim_waiting(study, me)
    if trial_id is None:
        trial_id = storage.create_new_trial(study._study_id, template_trial=_new_running(me))
    if is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial_id)
    try:
        trial = optuna.Trial(study, trial_id)
        for name, distribution in distributions.items():
            trial._suggest(name, distribution)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM unwound as one (moeprune.cli)
        fail_and_retry(study, storage.get_trial(trial_id), f"interrupted inside ask ({interrupt_name(e)})")
        raise
    except BaseException:
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        raise
    return trial


def interrupt_name(e: BaseException) -> str:
    return "SIGTERM" if type(e).__name__ == "Terminated" else "SIGINT"
