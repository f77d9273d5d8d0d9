"""Launchers: the GPU-slot logic behind hydra/launcher=joblib, two trials in parallel on CPU
through the real CLI, and the SLURM preset composing onto hydra-submitit-launcher's schema."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import moeprune.cli  # noqa: F401  (registers schema, resolvers and the sweeper plugin)
from moeprune import gpu_slots
from moeprune.errors import MoePruneError
from sweep_support import SMALL, moeprune, trial_records


@pytest.mark.parametrize("env, count, expected", [
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, 8, ["2", "3"]),  # the parent's own list wins over the count
    ({"CUDA_VISIBLE_DEVICES": "GPU-5f3a, GPU-77b1"}, None, ["GPU-5f3a", "GPU-77b1"]),  # UUIDs pass through
    ({"CUDA_VISIBLE_DEVICES": ""}, 8, []),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, 8, []),
    ({}, 4, ["0", "1", "2", "3"]),
    ({}, 0, []),
])
def test_visible_devices(env, count, expected):
    assert gpu_slots.visible_devices(env, count) == expected


def test_slots_map_round_robin_onto_devices():
    assert [gpu_slots.device_for_slot(s, ["0", "1"]) for s in range(4)] == ["0", "1", "0", "1"]
    assert gpu_slots.device_for_slot(0, []) is None


def _claim(lock_dir: str, slots: int, ready, release, out) -> None:
    try:
        out.put((gpu_slots.claim_slot(Path(lock_dir), slots), gpu_slots.claim_slot(Path(lock_dir), slots)))
    except MoePruneError as e:
        out.put(str(e))
    ready.set()
    release.wait(30)  # hold the slot, as a live worker does


def test_each_process_claims_its_own_slot_and_keeps_it(tmp_path):
    ctx = mp.get_context("fork")  # cheap, and the child starts with no slot of its own
    out, release = ctx.Queue(), ctx.Event()
    procs, results = [], []
    for _ in range(3):  # 2 slots, 3 processes: the third is refused with a clear message
        ready = ctx.Event()
        p = ctx.Process(target=_claim, args=(str(tmp_path), 2, ready, release, out))
        p.start()
        ready.wait(30)
        procs.append(p)
        results.append(out.get(timeout=30))
    assert results[0] == (0, 0) and results[1] == (1, 1), "a process keeps the slot it claimed"
    assert "all 2 GPU slots" in results[2] and "n_jobs" in results[2]
    release.set()
    for p in procs:
        p.join(30)
    # the OS dropped the locks with the processes: a new process gets slot 0 again
    ready, release2 = ctx.Event(), ctx.Event()
    release2.set()
    p = ctx.Process(target=_claim, args=(str(tmp_path), 2, ready, release2, out))
    p.start()
    assert out.get(timeout=30) == (0, 0)
    p.join(30)


def test_callback_pins_the_job_and_records_it(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setattr(gpu_slots, "_claimed", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    cb = gpu_slots.GpuSlotCallback(devices=["4", "5"], slots=2, lock_dir=str(tmp_path / "locks"))
    cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path / "job")}, "job": {"num": 3}}})
    cb.on_job_start(cfg)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    cb.on_job_end(cfg, None)
    rec = json.loads((tmp_path / "job" / gpu_slots.RECORD).read_text())
    assert rec["slot"] == 0 and rec["CUDA_VISIBLE_DEVICES"] == "4" and rec["job_num"] == 3
    assert rec["start"] <= rec["end"]
    with pytest.raises(MoePruneError, match="slots=0: expected at least 1"):
        gpu_slots.GpuSlotCallback(devices=[], slots=0, lock_dir=str(tmp_path))


def test_joblib_runs_two_trials_in_parallel_each_on_its_own_device(sweep_model, tmp_path):
    """A cold cache too: both jobs need the same profile and base eval at once; one builds each,
    the other waits for it (the runner's build lock) instead of both racing to write it."""
    sweep = tmp_path / "sweep"
    # No GPU here: hand the jobs two pretend device ids; the assignment path is the same.
    moeprune(["-m", "hparams_search=toy_recipe", f"model.path={sweep_model}", *SMALL,
              "hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=2",
              # recipes no other test scores, so both jobs do real work rather than hit the cache
              "hydra.sweeper.enqueue_default=false", "hydra.sweeper.sampler.seed=7",
              "hydra.callbacks.gpu_slots.devices=[0,1]", f"hydra.sweeper.storage=journal:{tmp_path}/study.journal",
              f"hydra.sweep.dir={sweep}"], tmp_path, tmp_path / "cache")
    records = trial_records(sweep)
    assert sorted(records) == [0, 1] and all(r["state"] == "COMPLETE" for r in records.values())
    slots = [json.loads((r["dir"] / gpu_slots.RECORD).read_text()) for r in records.values()]
    assert {s["CUDA_VISIBLE_DEVICES"] for s in slots} == {"0", "1"}
    assert len({s["pid"] for s in slots}) == 2
    a, b = slots
    assert a["start"] < b["end"] and b["start"] < a["end"], f"the two jobs did not overlap: {slots}"
    print("joblib jobs:", [(s["CUDA_VISIBLE_DEVICES"], round(s["end"] - s["start"], 2)) for s in slots],
          "start skew", round(abs(a["start"] - b["start"]), 2))
    logs = {n: "".join(p.read_text() for p in r["dir"].glob("*.log")) for n, r in records.items()}
    for n, s in zip(records, slots):  # the job's own log says which device it got
        assert f"CUDA_VISIBLE_DEVICES={s['CUDA_VISIBLE_DEVICES']}" in logs[n]
    # whether the second job arrives while the first still builds (and logs that it waited) depends
    # on start-up skew; that the profile is built once does not (test_runner holds the lock itself)
    assert sum("profile        waited for another process" in log for log in logs.values()) <= 1
    profiles = {json.loads((r["dir"] / "run.json").read_text())["stages"]["profile"]["cached"] for r in records.values()}
    assert profiles == {True, False}, "one job built the profile, the other reused it"


def test_slurm_preset_extends_the_submitit_schema():
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=["hparams_search=toy_recipe", "hydra/launcher=slurm",
                                                    "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.partition == "gpu"
    assert launcher.submitit_folder.endswith(".submitit/%j")  # a field only the plugin's schema has


def test_joblib_gpus_preset_resolves_whole(tmp_path):
    """`--cfg hydra --resolve` stores the resolved device list in the config: it must be a ListConfig."""
    proc = moeprune(["hparams_search=toy_recipe", "hydra/launcher=joblib_gpus", "--cfg", "hydra", "--resolve"],
                    tmp_path, tmp_path / "cache", extra_env={"CUDA_VISIBLE_DEVICES": "2,3"})
    hydra_cfg = OmegaConf.create(proc.stdout)
    assert list(hydra_cfg.hydra.callbacks.gpu_slots.devices) == ["2", "3"]
    assert hydra_cfg.hydra.launcher.n_jobs == 2 and hydra_cfg.hydra.callbacks.gpu_slots.slots == 2
