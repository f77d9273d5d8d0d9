"""What every stage of a run reads from the config: the model dir, and the recipe with its keep
count. The recipe is built in this one place (Recipe.of builds the strategy and types four config
nodes, which a run used to redo in every stage and preflight check) and kept per content of its
four nodes, so a cfg edited between calls (tests, a sweep's next job) gets its own."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moeprune.config import KeepConfig
from moeprune.models import resolve_model_dir
from moeprune.presets import class_weight_presets
from moeprune.prune.recipe import Recipe

RECIPE_KEYS = ("strategy", "class_weights", "floor_clamp", "keep")
_MAX_KEPT = 64  # recipes of one process: a sweep's distinct trials, each a handful of small dataclasses
_recipes: dict[str, Recipe] = {}


def model_dir(cfg: DictConfig) -> Path:
    return resolve_model_dir(cfg.model.path, cfg.model.revision)


def model_input(cfg: DictConfig) -> dict[str, Path]:
    return {"model": model_dir(cfg)}


def recipe(cfg: DictConfig) -> Recipe:
    """The run's recipe (strategy, class_weights, floor_clamp, keep), built once per content."""
    key = json.dumps({k: OmegaConf.to_container(cfg[k], resolve=True) for k in RECIPE_KEYS}, sort_keys=True,
                     default=str)
    found = _recipes.get(key)
    if found is None:
        found = Recipe.of(cfg.strategy, cfg.class_weights, cfg.floor_clamp, cfg.keep, class_weight_presets)
        if len(_recipes) >= _MAX_KEPT:
            _recipes.pop(next(iter(_recipes)))
        _recipes[key] = found
    return found


def keep(cfg: DictConfig) -> KeepConfig:
    """The run's keep settings, typed: the recipe's."""
    return recipe(cfg).keep
