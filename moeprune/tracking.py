"""Experiment tracking after a run: `logger=none` (nothing; wandb need not be installed) or
`logger=wandb` (one W&B run per run or sweep trial, offline by default).

A W&B run gets the resolved config, every stage's metrics and timings, the PNG images the stages
wrote (the drop map's keep heatmap), each stage's small JSON/JSONL files as a W&B artifact (drop
map, summaries, eval samples) and a per-class table of base vs pruned scores. In a sweep the
Optuna sweeper passes MOEPRUNE_STUDY and MOEPRUNE_TRIAL to the job: runs are grouped by study and
named by trial.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf

from moeprune import artifacts, schema
from moeprune.errors import MoePruneError
from moeprune.report import class_rows, score_columns
from moeprune.schema import Choice

log = logging.getLogger("moeprune")
ARTIFACT_SUFFIXES = (".json", ".jsonl")
MAX_ARTIFACT_FILE = 20 << 20  # stage files above this (checkpoints, GGUF) stay on disk only


class WandbMode(Choice):
    offline = "offline"  # no network; `wandb sync` later
    online = "online"
    disabled = "disabled"


@schema.schema("logger", "none")
@dataclass
class LoggerConfig:
    _target_: str = "moeprune.tracking.NullTracker"
    name: str = "none"


@schema.schema("logger", "wandb")
@dataclass
class WandbLoggerConfig(LoggerConfig):
    _target_: str = "moeprune.tracking.WandbTracker"
    name: str = "wandb"
    project: str = "moeprune"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.offline
    group: Optional[str] = None  # null: the Optuna study name in a sweep
    dir: Optional[str] = None  # where wandb/ goes; null: the run's output dir
    tags: List[str] = field(default_factory=list)


class NullTracker:
    """logger=none."""

    def __init__(self, cfg: LoggerConfig | None = None, **knobs) -> None:
        self.name = schema.make(LoggerConfig, cfg, knobs, "logger").name

    def log_run(self, cfg: DictConfig, results: dict, run_dir: Path, objective: Any = None) -> None:
        pass


def flat_metrics(results: dict) -> dict[str, float]:
    """{stage: {k: v, per_category: {c: v}}} -> {"stage/k": v, "stage/per_category/c": v}, numbers only."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)):  # bools too: `cached` is worth a column
            out[prefix] = float(value)

    for stage, metrics in results.items():
        walk(stage, metrics)
    return out


def stage_files(run_dir: Path) -> dict[str, tuple[str, list[Path]]]:
    """stage -> (cache key, its artifact's small JSON/JSONL files), from run.json."""
    run_json = Path(run_dir) / "run.json"
    if not run_json.exists():
        return {}
    out = {}
    for stage, info in artifacts.read_json(run_json)["stages"].items():
        root = Path(info["artifact"])
        files = sorted(p for p in root.iterdir() if p.suffix in ARTIFACT_SUFFIXES and p.is_file()
                       and p.stat().st_size <= MAX_ARTIFACT_FILE) if root.is_dir() else []
        out[stage] = (info["key"], files)
    return out


def stage_images(run_dir: Path) -> Iterable[tuple[str, Path]]:
    run_json = Path(run_dir) / "run.json"
    if not run_json.exists():
        return []
    for stage, info in artifacts.read_json(run_json)["stages"].items():
        root = Path(info["artifact"])
        for png in sorted(root.glob("*.png")) if root.is_dir() else []:
            yield f"{stage}/{png.stem}", png


class WandbTracker:
    """logger=wandb."""

    def __init__(self, cfg: WandbLoggerConfig | None = None, **knobs) -> None:
        cfg = schema.make(WandbLoggerConfig, cfg, knobs, "logger")
        self.name = cfg.name
        mode = WandbMode.parse(cfg.mode, "logger.mode", "offline, online or disabled")
        try:
            import wandb  # noqa: F401  (checked here, before the run, not after an hour of it)
        except ImportError:
            raise MoePruneError("logger=wandb needs the wandb package: pip install 'moeprune[wandb]' "
                                "(or run with logger=none)") from None
        self.project, self.entity, self.mode, self.group, self.dir = cfg.project, cfg.entity, str(mode), cfg.group, cfg.dir
        self.tags = list(cfg.tags or [])

    def log_run(self, cfg: DictConfig, results: dict, run_dir: Path, objective: Any = None) -> None:
        import wandb

        study, trial = os.environ.get("MOEPRUNE_STUDY"), os.environ.get("MOEPRUNE_TRIAL")
        run_dir = Path(run_dir)
        wandb_dir = Path(self.dir).expanduser() if self.dir else run_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                project=self.project, entity=self.entity, mode=self.mode, dir=str(wandb_dir),
                group=self.group or study, job_type="trial" if trial is not None else "run",
                name=f"{study}-trial{trial}" if trial is not None else run_dir.name,
                tags=self.tags, config=OmegaConf.to_container(cfg, resolve=True),
                # no console capture or system stats: they cost time on every trial, and tell nothing here
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True),
                reinit="create_new",
            )
        except Exception as e:  # wandb raises its own types (no API key, unreachable host...)
            raise MoePruneError(f"logger=wandb: wandb.init failed in mode {self.mode!r}: {e}; "
                                "logger.mode=offline needs no network") from None
        with run:
            metrics = flat_metrics(results)
            if objective is not None:
                values = objective if isinstance(objective, (list, tuple)) else [objective]
                metrics.update({f"objective/{i}": float(v) for i, v in enumerate(values)})
            if trial is not None:
                metrics["trial"] = int(trial)
            payload: dict[str, Any] = dict(metrics)
            for key, png in stage_images(run_dir):
                payload[key] = wandb.Image(str(png))
            headers, rows = class_rows(results)
            if rows:
                bench = next(r for _, r in score_columns(results) if r).get("bench")
                payload["per_class"] = wandb.Table(columns=["bench", *headers], data=[[bench, *r] for r in rows])
            run.log(payload)
            for stage, (key, files) in stage_files(run_dir).items():
                if files:
                    art = wandb.Artifact(f"{stage}-{key}", type=stage, metadata={"cache_key": key})
                    for f in files:
                        art.add_file(str(f))
                    run.log_artifact(art)
        log.info("wandb run %s (%s) in %s", run.name, self.mode, wandb_dir / "wandb")
