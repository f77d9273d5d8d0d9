"""One study shared by four `moeprune -m` workers on a real database server (PostgreSQL, started
here) and on a shared journal file; one worker is SIGKILLed mid-trial. The study must end with
exactly the trials asked for complete, none lost and none counted twice, the killed trial FAIL and
its parameters run once more, and the other workers undisturbed. On PostgreSQL the killed worker
runs under another host name (a UTS namespace), so only Optuna's heartbeat can tell it died; on the
journal, which has no heartbeat, the workers share a host and the dead pid tells."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pg_server
import pytest
from sweep_support import SMALL, sweep_cache, sweep_model, trial_records  # noqa: F401  (fixtures)

from hydra_plugins.moeprune_optuna_sweeper import _workers

pytestmark = pytest.mark.slow
WORKERS, TRIALS_EACH, GRACE = 4, 2, 3
OTHER_HOST = "moeprune-worker-b"


def can_rename_host() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--uts", "hostname", OTHER_HOST], capture_output=True).returncode == 0


def start(args: list[str], cwd: Path, cache: Path, log: Path, host: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "moeprune", *args]
    if host:  # exec keeps the pid: the test kills moeprune itself
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_mid_trial(sweep_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the worker has a job running: its job dir exists, its trial record does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker to kill ended before its first trial"
        if any(not (p.parent.parent / "optuna_trial.json").exists() for p in sweep_dir.glob("*/.hydra/hydra.yaml")):
            return
        time.sleep(0.05)
    raise AssertionError("the worker to kill never started a trial")


def run_shared_study(root: Path, storage: str, model: Path, cache: Path, killed_host: str | None) -> dict:
    """Four workers, worker 0 killed mid-trial, then worker 0's command run again (as a requeued job
    would) once the grace period is over. Returns what the checks need."""
    common = ["-m", "hparams_search=toy_recipe", f"model.path={model}", *SMALL, "logger=none",
              f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
              f"hydra.sweeper.n_trials={TRIALS_EACH}", "hydra.sweeper.heartbeat_interval=1",
              f"hydra.sweeper.grace_period={GRACE}"]
    t0 = time.monotonic()
    procs = [start([*common, f"hydra.sweep.dir={root}/w{i}"], root, cache, root / f"w{i}.log",
                   killed_host if i == 0 else None) for i in range(WORKERS)]
    try:
        wait_mid_trial(root / "w0", procs[0])
        procs[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    time.sleep(max(0.0, killed_at + GRACE + 1 - time.monotonic()))
    rerun = start([*common, f"hydra.sweep.dir={root}/w0-again"], root, cache, root / "w0-again.log")
    rerun_code = rerun.wait(timeout=400)
    return {"codes": codes, "rerun": rerun_code, "wall_s": time.monotonic() - t0,
            "logs": {p.stem: p.read_text() for p in root.glob("*.log")}}


def check_study(study: optuna.Study, root: Path, out: dict, killed_host: str | None) -> dict:
    assert out["codes"][0] == -signal.SIGKILL
    assert out["codes"][1:] == [0] * (WORKERS - 1), out["logs"]
    assert out["rerun"] == 0, out["logs"]["w0-again"][-3000:]
    trials = study.trials
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "FAIL", "RUNNING", "WAITING")}
    assert not by_state["RUNNING"] and not by_state["WAITING"], [t.state.name for t in trials]
    assert len(by_state["COMPLETE"]) == WORKERS * TRIALS_EACH, [(t.number, t.state.name) for t in trials]
    (killed,) = by_state["FAIL"]
    assert killed.user_attrs[_workers.WORKER_ATTR]["host"] == (killed_host or os.uname().nodename)
    retries = [t for t in trials if t.user_attrs.get(_workers.RETRY_ATTR) == killed.number]
    assert [t.state.name for t in retries] == ["COMPLETE"]  # retried once, and it completed
    assert retries[0].params == killed.params  # killed mid-trial: its ask had drawn every parameter
    defaults = [t for t in by_state["COMPLETE"] if t.user_attrs.get(_workers.DEFAULT_ATTR)]
    assert len(defaults) == 1  # the default recipe scored once, by whichever worker took it
    # Every complete trial recorded in exactly one job dir; each live worker ran its own two.
    records = [r for d in sorted(root.glob("w*/")) for r in trial_records(d).values()]
    complete = sorted(r["number"] for r in records if r["state"] == "COMPLETE")
    assert complete == sorted(t.number for t in by_state["COMPLETE"])
    for i in range(1, WORKERS):
        assert [r["state"] for r in trial_records(root / f"w{i}").values()] == ["COMPLETE"] * TRIALS_EACH
    return {"complete": len(complete), "failed": len(by_state["FAIL"]), "retried": len(retries),
            "pruned duplicates": sum(t.state.name == "PRUNED" for t in trials), "wall_s": round(out["wall_s"], 1)}


@pytest.mark.skipif(pg_server.bindir() is None and not os.environ.get("CI"),
                    reason="no PostgreSQL server binaries here (CI installs Debian's postgresql and runs this)")
def test_four_workers_on_postgresql_survive_one_killed_mid_trial(tmp_path, sweep_model, sweep_cache):
    host = OTHER_HOST if can_rename_host() else None
    with pg_server.server() as url:
        out = run_shared_study(tmp_path, url, sweep_model, sweep_cache, host)
        figures = check_study(optuna.load_study(study_name="shared", storage=url), tmp_path, out, host)
    if host:  # another host's trial: only the heartbeat could fail it
        assert "no heartbeat from" in out["logs"]["w0-again"] + "".join(out["logs"].values())
    print("postgresql:", figures)


def test_four_workers_on_a_journal_file_survive_one_killed_mid_trial(tmp_path, sweep_model, sweep_cache):
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "shared" / "study.log"
    out = run_shared_study(tmp_path, f"journal:{journal}", sweep_model, sweep_cache, None)
    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    figures = check_study(study, tmp_path, out, None)
    print("journal:", figures)
