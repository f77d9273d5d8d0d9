"""The `moeprune` entrypoint: compose the config with Hydra, run the enabled stages, print the table.

Returns the objective (`optimized_metric`) so Hydra sweepers (Optuna) can optimize it.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import hydra_plugins.moeprune_optuna_sweeper as sweeper_plugin
from moeprune import config, overrides, registrations
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")
PKG_DIR = registrations.PKG_DIR

registrations.register()
# the sweeper class, which only the app launches (see moeprune/registrations.py); also from an
# editable install, whose hydra_plugins Hydra's scan cannot see
sweeper_plugin.register()


def objective(results: dict, metric) -> float | list | None:
    """The value at `metric` ("stage.key", or deeper: "evaluate.per_category.generic_code"), or a
    list of values for a list of metrics (multi-objective); None when that stage did not run."""
    if not metric:
        return None
    if not isinstance(metric, str):
        values = [objective(results, m) for m in metric]
        return None if any(v is None for v in values) else values
    stage, *path = metric.split(".")
    node = results.get(stage)
    if node is None:
        return None
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            where = ".".join([stage, *path[:i]])
            choices = sorted(k for k, v in node.items() if isinstance(v, (int, float, dict))) if isinstance(node, dict) else []
            raise MoePruneError(f"optimized_metric={metric}: {where} has no {key!r}; expected one of {choices}")
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise MoePruneError(f"optimized_metric={metric} is {node!r}: expected a number")
    return float(node)


def run(cfg: DictConfig) -> dict:
    from moeprune import preflight
    from moeprune.runner import Runner
    from moeprune.stages import stages_for

    run_dir = Path(cfg.paths.output_dir)
    if not preflight.checked_runs.take(run_dir):  # a sweep job: Hydra's callback checks runs, not jobs
        preflight.check_run(cfg, run_dir)
    runner = Runner(cfg, stages_for(cfg), run_dir)
    return runner.run(cfg.stage, preflight=False)


@hydra.main(version_base="1.3", config_path="pkg://moeprune.conf", config_name="run")
def hydra_main(cfg: DictConfig) -> float | None:
    from moeprune.report import results_table

    try:
        tracker = config.build(cfg.logger)  # first: a bad logger config fails before any work
        results = run(cfg)
        value = objective(results, cfg.optimized_metric)
        tracker.log_run(cfg, results, Path(cfg.paths.output_dir), value)
    except MoePruneError as e:
        log.error("%s", e)
        if _in_sweep():  # the sweeper records the failed trial and goes on with the next
            raise
        print(f"moeprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    table = results_table(results)
    if table:
        print(table)
    if value is not None:
        log.info("objective %s = %s", cfg.optimized_metric, value)
    return value


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    if sys.argv[1:2] == ["compare"]:  # `moeprune compare <run A> <run B>`: per-bench deltas, agreement
        from moeprune.evaluate.compare import main as compare_main

        sys.exit(compare_main(sys.argv[2:]))
    if sys.argv[1:2] == ["report"]:  # `moeprune report <dir>...`: a plain command, no Hydra config
        from moeprune.study_report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    try:
        overrides.check(sys.argv[1:])
    except MoePruneError as e:
        print(f"moeprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    previous = signal.signal(signal.SIGTERM, _terminate)
    done = False
    try:
        hydra_main()
        done = True
    except KeyboardInterrupt as e:  # temp dirs were removed on the way out (artifacts.atomic_dir)
        how, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"moeprune: {how}: finished stages stay cached; run the same command again to go on", file=sys.stderr)
        sys.exit(code)
    finally:
        if done and getattr(sys.modules.get("__main__"), "main", None) is main:
            # The run is complete and recorded; a SIGTERM or Ctrl-C while the interpreter exits (atexit
            # handlers, a tracker's flush) would turn its exit status into -15 or -2. Only as the
            # process's entry point: an in-process caller keeps its own handlers.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C: a stage's temp dir is removed, nothing half-built is kept."""


def _terminate(signum, frame) -> None:
    raise Terminated()


if __name__ == "__main__":
    main()
