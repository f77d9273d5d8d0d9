"""The `moeprune` entrypoint: compose the config with Hydra, run the enabled stages, print the table.

Returns the objective (`optimized_metric`) so Hydra sweepers (Optuna) can optimize it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import moeprune
from moeprune import config
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")
PKG_DIR = Path(moeprune.__file__).resolve().parent

if not OmegaConf.has_resolver("moeprune_pkg"):
    # `${moeprune_pkg:toy/model}` -> a path inside the installed package (the embedded toy model).
    OmegaConf.register_new_resolver("moeprune_pkg", lambda rel="": str(PKG_DIR / rel))
config.register()


def objective(results: dict, metric: str | None) -> float | None:
    if not metric:
        return None
    stage, _, key = metric.partition(".")
    value = results.get(stage, {}).get(key)
    return float(value) if value is not None else None


def run(cfg: DictConfig) -> dict:
    from moeprune.runner import Runner
    from moeprune.stages import STAGES

    run_dir = Path(cfg.paths.output_dir)
    runner = Runner(cfg, STAGES, run_dir)
    return runner.run(cfg.stage)


@hydra.main(version_base="1.3", config_path="pkg://moeprune.conf", config_name="run")
def hydra_main(cfg: DictConfig) -> float | None:
    from moeprune.report import results_table

    try:
        results = run(cfg)
    except MoePruneError as e:
        log.error("%s", e)
        print(f"moeprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    table = results_table(results)
    if table:
        print(table)
    value = objective(results, cfg.optimized_metric)
    if value is not None:
        log.info("objective %s = %.6g", cfg.optimized_metric, value)
    return value


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
