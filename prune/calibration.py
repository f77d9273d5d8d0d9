"""Calibration corpora: class name -> list of texts, each profiled as one pass."""

from __future__ import annotations

from omegaconf import DictConfig

from moeprune.errors import MoePruneError


def load_corpus(cfg: DictConfig) -> dict[str, list[str]]:
    if cfg.source == "toy":
        from moeprune.toy import world

        classes = list(cfg.classes) or list(world.CLASSES)
        unknown = [c for c in classes if c not in world.CLASSES]
        if unknown:
            raise MoePruneError(
                f"calibration.classes: unknown toy classes {unknown}; expected some of {list(world.CLASSES)}"
            )
        return {
            c: [t.prompt + t.answer for t in world.make_tasks(c, cfg.samples_per_class, "calib", cfg.seed)]
            for c in classes
        }
    raise MoePruneError(f"calibration.source={cfg.source!r}: expected 'toy'")
