"""The stage runner: resolves each enabled stage's cache key, reuses or builds its artifact.

A stage is a pure function of (its config slice, its upstream artifacts, its external inputs such
as the model directory). Its cache key hashes exactly those, so a sweep trial that changes only a
recipe knob reuses the profile and pays only for the drop map onward. The runner, not the stage,
handles caching, manifests, timing and the run directory's links.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from moeprune import artifacts
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")


@dataclass
class StageContext:
    cfg: DictConfig
    out_dir: Path  # write the artifact here (a temp dir, renamed when the stage returns)
    inputs: dict[str, Path]  # upstream stage name -> its artifact dir
    results: dict[str, dict] = field(default_factory=dict)  # metrics of stages run so far


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[StageContext], dict]
    config_keys: tuple[str, ...]  # dotted cfg keys that make this stage's config slice
    inputs: tuple[str, ...] = ()  # upstream stages whose artifacts it reads
    external: Callable[[DictConfig], dict[str, Path]] = lambda cfg: {}  # files hashed into the key
    version: int = 1  # bump when the stage's code changes what it writes
    enabled: Callable[[DictConfig], bool] = lambda cfg: True
    # checked before any stage of the run starts (e.g. the bench's data loads), so a long profile
    # is not lost to an input a later stage cannot read
    preflight: Callable[[DictConfig], None] | None = None


def config_slice(cfg: DictConfig, keys: tuple[str, ...]) -> dict:
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


class Runner:
    def __init__(self, cfg: DictConfig, stages: list[Stage], run_dir: Path):
        self.cfg = cfg
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cfg.paths.cache_dir).expanduser()
        self.keys: dict[str, str] = {}
        self.dirs: dict[str, Path] = {}
        self._input_hashes: dict[tuple[Path, bool], str] = {}  # several stages read the same model dir
        self.results: dict[str, dict] = {}

    def key(self, stage: Stage) -> tuple[str, dict]:
        full = bool(OmegaConf.select(self.cfg, "cache.verify_large_files", default=False))
        ext = {}
        for name, path in stage.external(self.cfg).items():
            path = Path(path)
            if not path.exists():
                raise MoePruneError(f"{stage.name}: input {name} not found: {path}")
            if (path, full) not in self._input_hashes:
                self._input_hashes[(path, full)] = artifacts.hash_path(path, full)
            ext[name] = self._input_hashes[(path, full)]
        payload = {
            "stage": stage.name,
            "version": stage.version,
            "config": config_slice(self.cfg, stage.config_keys),
            "inputs": {name: self.keys[name] for name in stage.inputs},
            "external": ext,
        }
        return artifacts.hash_json(payload)[:20], payload

    def run(self, only: str | None = None) -> dict[str, dict]:
        wanted = self.order if only in (None, "all") else self._with_upstream(only)
        checks = {self.stages[n].preflight for n in wanted if self.stages[n].enabled(self.cfg)} - {None}
        for check in checks:
            check(self.cfg)
        for name in wanted:
            stage = self.stages[name]
            if not stage.enabled(self.cfg):
                log.info("%-14s skipped (disabled by config)", name)
                continue
            missing = [i for i in stage.inputs if i not in self.dirs]
            if missing:
                raise MoePruneError(f"stage {name} needs {', '.join(missing)}, which is disabled")
            self._run_stage(stage)
        artifacts.write_json(self.run_dir / "run.json", {
            "stages": {n: {"artifact": str(self.dirs[n]), "key": self.keys[n], **self.results[n]}
                       for n in self.dirs},
        })
        return self.results

    def _with_upstream(self, name: str) -> list[str]:
        if name not in self.stages:
            raise MoePruneError(f"unknown stage {name!r}; expected all or one of: {', '.join(self.order)}")
        needed, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in needed:
                needed.add(n)
                todo.extend(self.stages[n].inputs)
        return [n for n in self.order if n in needed]

    def _run_stage(self, stage: Stage) -> None:
        key, payload = self.key(stage)
        final = self.cache_dir / stage.name / key
        manifest_path = final / artifacts.MANIFEST
        # Parallel sweep jobs on a cold cache want the same artifacts (the profile, the base eval):
        # one process builds each while the others wait, then find it cached.
        with artifacts.build_lock(self.cache_dir / ".locks" / f"{stage.name}-{key}.lock") as waited:
            if waited:
                log.info("%-14s waited for another process building %s", stage.name, final)
            if manifest_path.exists() and not (self.cfg.cache.refresh and not waited):
                manifest = artifacts.read_json(manifest_path)
                log.info("%-14s cached   %s", stage.name, final)
                self.results[stage.name] = {"cached": True, **manifest["metrics"]}
            else:
                t0 = time.perf_counter()
                with artifacts.atomic_dir(final) as tmp:
                    ctx = StageContext(self.cfg, tmp, {n: self.dirs[n] for n in stage.inputs}, self.results)
                    metrics = stage.fn(ctx) or {}
                    wall = time.perf_counter() - t0
                    artifacts.write_json(tmp / artifacts.MANIFEST, {
                        "stage": stage.name,
                        "key": key,
                        **payload,
                        "metrics": metrics,
                        "wall_time_s": round(wall, 3),
                        "versions": artifacts.package_versions(),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    })
                log.info("%-14s built    %s (%.1f s)", stage.name, final, wall)
                self.results[stage.name] = {"cached": False, "wall_time_s": round(wall, 3), **metrics}
        self.keys[stage.name] = key
        self.dirs[stage.name] = final
        link = self.run_dir / stage.name
        if not link.exists():
            link.symlink_to(final, target_is_directory=True)
