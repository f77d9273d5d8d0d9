"""The Hydra Sweeper class Hydra's plugin scan finds. It only holds the config; `_core` (not scanned,
so not imported on every `moeprune` start) does the work with optuna."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import OptunaSweeperConf  # noqa: F401  (registers the config groups)


@contextmanager
def _user_errors() -> Iterator[None]:
    """A bad sweeper setting ends the command like any moeprune error (message, exit 2), instead of
    the traceback Hydra prints for exceptions raised outside a job."""
    from moeprune.errors import MoePruneError

    try:
        yield
    except MoePruneError as e:
        print(f"moeprune: error: {e}", file=sys.stderr)
        sys.exit(2)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: Any, params: Optional[DictConfig] = None,
                 enqueue_default: bool = False, allow_test_split: bool = False, enqueue: Any = None,
                 heartbeat_interval: Optional[int] = None, grace_period: Optional[int] = None,
                 confirm: Any = None) -> None:
        from ._core import OptunaSweeperImpl

        with _user_errors():
            self.impl = OptunaSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs, params,
                                          enqueue_default, allow_test_split, enqueue, heartbeat_interval,
                                          grace_period, confirm)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        with _user_errors():
            self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        with _user_errors():
            return self.impl.sweep(arguments)
