"""The stage runner: resolves each enabled stage's cache key, reuses or builds its artifact.

A stage is a pure function of (its config slice, its upstream artifacts, its external inputs such
as the model directory). Its cache key hashes exactly those, so a sweep trial that changes only a
recipe knob reuses the profile and pays only for the drop map onward. The runner, not the stage,
handles caching, manifests, timing and the run directory's links.
"""

from __future__ import annotations

import logging
import os
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
        self.cache_dir = cache_dir(cfg)
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

    def wanted(self, only: str | None) -> list[str]:
        """The stages `only` (a stage name, or all) runs, upstream included; a stage asked for by
        name that the config disables is an error (stage=quant with quant_tier=none did nothing)."""
        if only in (None, "all"):
            return self.order
        wanted = self._with_upstream(only)
        if not self.stages[only].enabled(self.cfg):
            raise MoePruneError(f"stage={only}, but the config disables the {only} stage: expected it enabled "
                                f"(stages.{only}=true{', and a quant_tier other than none' if only == 'quant' else ''})")
        return wanted

    def preflight(self, only: str | None = None) -> None:
        """Every check that can run before the first stage: each stage's own preflight, then
        whether the cache can take the artifacts this run has to build."""
        wanted = [n for n in self.wanted(only) if self.stages[n].enabled(self.cfg)]
        for name in wanted:  # else found only when the stage is reached, after the run dir is made
            disabled = [i for i in self.stages[name].inputs if i not in wanted]
            if disabled:
                raise MoePruneError(f"stage {name} needs {', '.join(disabled)}, which is disabled: expected "
                                    + " ".join(f"stages.{i}=true" for i in disabled))
        checks = {self.stages[n].preflight for n in wanted} - {None}
        for check in checks:
            check(self.cfg)
        if not artifacts.writable(self.cache_dir):
            to_build = self.to_build(wanted)
            if to_build:
                raise MoePruneError(f"paths.cache_dir={self.cache_dir} is not writable, and this run has to build "
                                    f"{', '.join(to_build)}: expected a writable cache dir (MOEPRUNE_CACHE)")

    def to_build(self, wanted: list[str]) -> list[str]:
        """The stages whose artifact is not in the cache yet (keys only: nothing runs)."""
        keys, out = dict(self.keys), []
        try:
            for name in wanted:
                stage = self.stages[name]
                self.keys[name] = self.key(stage)[0]
                if self.cfg.cache.refresh or not (self.cache_dir / name / self.keys[name] / artifacts.MANIFEST).exists():
                    out.append(name)
        finally:
            self.keys = keys
        return out

    def run(self, only: str | None = None, preflight: bool = True) -> dict[str, dict]:
        if preflight:
            self.preflight(only)
        wanted = self.wanted(only)
        artifacts.remove_dead_temps(self.cache_dir, self.order, lock_path=self._lock_path)
        self._publish()  # the run dir forgets the links of a previous run before this one starts
        for name in wanted:
            stage = self.stages[name]
            if not stage.enabled(self.cfg):
                log.info("%-14s skipped (disabled by config)", name)
                continue
            missing = [i for i in stage.inputs if i not in self.dirs]
            if missing:
                raise MoePruneError(f"stage {name} needs {', '.join(missing)}, which is disabled")
            self._run_stage(stage)
            self._publish()
        return self.results

    def _publish(self) -> None:
        """Make the run dir's stage links and run.json describe the stages done so far, and only
        those: a reused run dir keeps no link of another run, an interrupted one no link that
        run.json does not list."""
        try:
            self._write_links()
        except OSError as e:  # links and run.json are each replaced atomically: nothing is half-written
            if not artifacts.out_of_space(e):
                raise
            raise MoePruneError(f"the run dir (hydra.run.dir) {self.run_dir} ran out of disk space ({e}): expected "
                                "free space there; the stages built so far stay cached") from None

    def _write_links(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for link in self.run_dir.iterdir():
            if link.is_symlink() and link.name not in self.dirs and _is_artifact_link(link):
                link.unlink()
        for name, final in self.dirs.items():
            link = self.run_dir / name
            if link.is_symlink() and link.readlink() == final:
                continue
            if link.exists() and not link.is_symlink():
                raise MoePruneError(f"run dir {self.run_dir} holds {link}, which is not a stage link: expected a "
                                    "fresh run dir (hydra.run.dir=...) or one written by moeprune")
            tmp = self.run_dir / f".{name}.link-tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(final, target_is_directory=True)
            os.replace(tmp, link)
        artifacts.write_json(self.run_dir / "run.json", {
            "stages": {n: {"artifact": str(self.dirs[n]), "key": self.keys[n], **self.results[n]}
                       for n in self.dirs},
        })

    def _lock_path(self, stage: str, key: str) -> Path:
        return self.cache_dir / ".locks" / f"{stage}-{key}.lock"

    def _with_upstream(self, name: str) -> list[str]:
        if name not in self.stages:
            raise MoePruneError(f"unknown stage {name!r}; expected all or one of: {', '.join(self.order)}")
        needed = upstream(self.stages, name)
        return [n for n in self.order if n in needed]

    def _run_stage(self, stage: Stage) -> None:
        key, payload = self.key(stage)
        final = self.cache_dir / stage.name / key
        manifest_path = final / artifacts.MANIFEST
        if manifest_path.exists() and not self.cfg.cache.refresh:  # no lock: a read-only cache serves too
            log.info("%-14s cached   %s", stage.name, final)
            self.results[stage.name] = {"cached": True, **_manifest(manifest_path)["metrics"]}
            self.keys[stage.name], self.dirs[stage.name] = key, final
            return
        # Parallel sweep jobs on a cold cache want the same artifacts (the profile, the base eval):
        # one process builds each while the others wait, then find it cached.
        with artifacts.build_lock(self._lock_path(stage.name, key)) as waited:
            if waited:
                log.info("%-14s waited for another process building %s", stage.name, final)
            if manifest_path.exists() and not (self.cfg.cache.refresh and not waited):
                manifest = _manifest(manifest_path)
                log.info("%-14s cached   %s", stage.name, final)
                self.results[stage.name] = {"cached": True, **manifest["metrics"]}
            else:
                t0 = time.perf_counter()
                try:
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
                except Exception as e:  # the temp dir is gone (atomic_dir); say why in one line
                    if isinstance(e, MoePruneError) or not artifacts.out_of_space(e):
                        raise
                    raise MoePruneError(f"the {stage.name} stage ran out of disk space building {final} ({e}): "
                                        f"expected free space under paths.cache_dir={self.cache_dir} (or MOEPRUNE_CACHE "
                                        "on a larger disk); nothing of the stage was kept") from None
                log.info("%-14s built    %s (%.1f s)", stage.name, final, wall)
                self.results[stage.name] = {"cached": False, "wall_time_s": round(wall, 3), **metrics}
        self.keys[stage.name], self.dirs[stage.name] = key, final


def upstream(stages: dict[str, Stage], name: str) -> set[str]:
    """`name` and every stage whose artifact it reads, transitively."""
    needed, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(stages[n].inputs)
    return needed


def cache_dir(cfg: DictConfig) -> Path:
    """paths.cache_dir as an absolute path: the run dir's links must not dangle when read from
    elsewhere, and an empty MOEPRUNE_CACHE must not put the cache in the working directory."""
    value = str(OmegaConf.select(cfg, "paths.cache_dir") or "").strip()
    if not value:
        raise MoePruneError("paths.cache_dir is empty (MOEPRUNE_CACHE set to an empty string?): expected a directory "
                            "for the stage artifacts; unset MOEPRUNE_CACHE for the default outputs/cache")
    return Path(os.path.abspath(Path(value).expanduser()))


def _manifest(path: Path) -> dict:
    try:
        manifest = artifacts.read_json(path)
        manifest["metrics"]  # noqa: B018 (the key every cached result is read from)
        return manifest
    except (ValueError, KeyError, TypeError) as e:
        raise MoePruneError(f"{path} is unreadable ({type(e).__name__}: {e}): expected a stage manifest; rebuild it "
                            f"with cache.refresh=true or by deleting {path.parent}") from None


def _is_artifact_link(link: Path) -> bool:
    """A stage link written by a run: it points at a cache artifact (or did, if the cache is gone)."""
    return not link.exists() or (link / artifacts.MANIFEST).is_file()
