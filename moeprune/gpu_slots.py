"""One GPU per parallel sweep job: `hydra/launcher=joblib` runs trials in worker processes, and
this Hydra callback pins each worker to one GPU by setting CUDA_VISIBLE_DEVICES before the job runs.

joblib (loky) reuses worker processes across batches, and a process whose CUDA runtime has started
cannot switch devices, so a GPU is bound to a *process*, not to a job number: each worker claims a
free slot by taking an exclusive lock on `<lock_dir>/slot-<i>.lock` (released by the OS when the
worker exits) and keeps it for its lifetime. Slot i runs on device i mod (number of devices), so
n_jobs = number of GPUs gives one job per GPU, and n_jobs > GPUs shares them round-robin.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from moeprune import artifacts
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")
ENV = "CUDA_VISIBLE_DEVICES"
RECORD = "gpu_slot.json"
_claimed: Optional[tuple[str, int, Any]] = None  # (lock_dir, slot, open lock file) of this process


def visible_devices(env: Optional[dict] = None, count: Optional[int] = None) -> list[str]:
    """The GPUs this process may hand out, as CUDA_VISIBLE_DEVICES entries: the parent's own
    CUDA_VISIBLE_DEVICES list when set (so `CUDA_VISIBLE_DEVICES=2,3 moeprune -m ...` uses 2 and 3),
    else every device torch sees."""
    env = os.environ if env is None else env
    raw = env.get(ENV)
    if raw is not None:
        devices = [d.strip() for d in raw.split(",") if d.strip()]
        return [] if devices in ([], ["-1"]) else devices
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def device_for_slot(slot: int, devices: Sequence[str]) -> Optional[str]:
    return str(devices[slot % len(devices)]) if devices else None


def claim_slot(lock_dir: Path, slots: int) -> int:
    """This process's slot in [0, slots): the one it already holds, else the first free one."""
    global _claimed
    lock_dir = Path(lock_dir)
    if _claimed is not None and _claimed[0] == str(lock_dir):
        return _claimed[1]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(slots):
        f = open(lock_dir / f"slot-{slot}.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} {os.getpid()}\n")  # who holds it, for a human looking
        f.flush()
        if _claimed is not None:  # a new sweep dir in a reused process: let the old slot go
            _claimed[2].close()
        _claimed = (str(lock_dir), slot, f)
        return slot
    raise MoePruneError(f"all {slots} GPU slots in {lock_dir} are held by other jobs: more parallel jobs than "
                        f"slots; set hydra.callbacks.gpu_slots.slots to the launcher's n_jobs")


class GpuSlotCallback(Callback):
    """Pins each job's process to one device and records it (gpu_slot.json in the job dir)."""

    def __init__(self, devices: Optional[Sequence[Any]], slots: int, lock_dir: str) -> None:
        self.devices = [str(d) for d in (devices or [])]
        self.slots = int(slots)
        if self.slots < 1:
            raise MoePruneError(f"hydra.callbacks.gpu_slots.slots={slots}: expected at least 1 (the launcher's n_jobs)")
        self.lock_dir = Path(lock_dir)
        self._started: Optional[float] = None
        self._slot: Optional[int] = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()
        self._slot = claim_slot(self.lock_dir, self.slots)
        device = device_for_slot(self._slot, self.devices)
        if device is None:
            log.info("gpu slot %d: no GPU visible, job runs on CPU (pid %d)", self._slot, os.getpid())
            return
        self._check_cuda_not_started(device)
        os.environ[ENV] = device
        log.info("gpu slot %d: %s=%s (pid %d)", self._slot, ENV, device, os.getpid())

    @staticmethod
    def _check_cuda_not_started(device: str) -> None:
        """A process whose CUDA runtime already started on another device would silently ignore the
        new CUDA_VISIBLE_DEVICES."""
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized() and os.environ.get(ENV) != device:
            raise MoePruneError(f"this process already started CUDA with {ENV}={os.environ.get(ENV)!r}; "
                                f"cannot move it to device {device}")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        out = Path(str(OmegaConf.select(config, "hydra.runtime.output_dir")))
        artifacts.write_json(out / RECORD, {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slot": self._slot,
            ENV: device_for_slot(self._slot, self.devices) if self._slot is not None else None,
            "job_num": OmegaConf.select(config, "hydra.job.num"),
            "start": self._started,
            "end": time.time(),
            "status": getattr(getattr(job_return, "status", None), "name", None),
        })


def register_resolvers() -> None:
    """`${moeprune_gpus:}` -> the visible devices; `${moeprune_n_gpus:1}` -> their count, or the
    fallback when there is none (the joblib preset's n_jobs)."""
    if not OmegaConf.has_resolver("moeprune_gpus"):
        # a ListConfig, not a list: `--cfg hydra --resolve` stores resolved values in the config
        OmegaConf.register_new_resolver("moeprune_gpus", lambda: OmegaConf.create(visible_devices()))
    if not OmegaConf.has_resolver("moeprune_n_gpus"):
        OmegaConf.register_new_resolver("moeprune_n_gpus", lambda fallback=1: len(visible_devices()) or int(fallback))
