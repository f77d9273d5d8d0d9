"""The Hydra Sweeper class Hydra's plugin scan finds. It only holds the config; `_core` (not scanned,
so not imported on every `moeprune` start) does the work with optuna."""

from __future__ import annotations

from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import OptunaSweeperConf  # noqa: F401  (registers the config groups)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: Any, params: Optional[DictConfig] = None,
                 enqueue_default: bool = False) -> None:
        from ._core import OptunaSweeperImpl

        self.impl = OptunaSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs, params,
                                      enqueue_default)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.impl.sweep(arguments)
