"""The dropmap stage: the recipe run over the profile (or `keep.drop_map` given, checked against the
model), and the recipe's own checks before any stage runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from moeprune import artifacts
from moeprune.adapters import adapter_for
from moeprune.dropmap import DropMap
from moeprune.errors import MoePruneError
from moeprune.models import read_config
from moeprune.prune.surgery import check_checkpoint
from moeprune.presets import class_weight_presets
from moeprune.profile import Profile
from moeprune.prune import floor
from moeprune.prune import recipe as engine
from moeprune.prune.recipe import DROP_MAP_FILE, SUMMARY_FILE
from moeprune.runner import StageContext
from moeprune.stages.plan import keep, model_dir, recipe
from moeprune.stages.profile import given_profile, profiled_config, recorded_top_k


def run_dropmap(ctx: StageContext) -> dict:
    cfg, profile = ctx.cfg, Profile.load(ctx.inputs["profile"])
    config = profiled_config(cfg)
    if config is None:  # an imported profile, no model: the map from the profile alone; the model's checks at prune
        top_k = recorded_top_k(cfg, profile)
        result = engine.build(profile, recipe(cfg), top_k)
        DropMap.parse(result.as_json(), num_experts=profile.num_experts, top_k=top_k, layers=profile.layers,
                      physical=cfg.keep.mode == "uniform")
        return _write_dropmap(ctx, result, profile)
    adapter = adapter_for(config)
    groups = None if cfg.keep.drop_map is not None else engine.fit_keep_to_model(keep(cfg), adapter, config)
    result = engine.build(profile, recipe(cfg), adapter.top_k(config), groups)
    # the one check against the model: layers, ids, top_k, one count (uniform), routing rules (groups...)
    DropMap.for_model(result.as_json(), adapter, config, physical=cfg.keep.mode == "uniform", layers=profile.layers)
    return _write_dropmap(ctx, result, profile)


def given_map(cfg: DictConfig) -> DropMap:
    """keep.drop_map checked against the model it will prune: layers, ids, top_k, routing rules."""
    try:
        return map_for_model(Path(cfg.keep.drop_map), model_dir(cfg), physical=cfg.keep.mode == "uniform",
                             layers=check_checkpoint(model_dir(cfg)))
    except MoePruneError as e:
        raise MoePruneError(f"keep.drop_map={cfg.keep.drop_map}: {e}") from None


def run_given_dropmap(ctx: StageContext) -> dict:
    """keep.drop_map in a run that builds no profile (stage=prune, evaluate ...): the map, checked
    against the model, is the artifact. Its summary counts experts but scores none: scoring it by
    the recipe needs the profile, which only stage=all / dropmap / quant compute (a large model
    would pay a calibration pass, and need a tokenizer, for a map it was given)."""
    cfg, drop_map = ctx.cfg, given_map(ctx.cfg)
    kept = drop_map.kept_counts()
    summary = {"imported_from": str(cfg.keep.drop_map), "scored": False, "num_experts": drop_map.num_experts,
               "keep_mode": cfg.keep.mode, "keep_per_layer": kept[0] if len(kept) == 1 else None,
               "kept_total": sum(len(ids) for ids in drop_map.kept().values()),
               "layers": {str(layer): {"kept": drop_map.num_experts - len(ids), "dropped": len(ids)}
                          for layer, ids in drop_map.items()}}
    artifacts.write_json(ctx.out_dir / DROP_MAP_FILE, drop_map.as_json())
    artifacts.write_json(ctx.out_dir / SUMMARY_FILE, summary)
    return {"keep_per_layer": summary["keep_per_layer"], "num_experts": drop_map.num_experts,
            "kept_total": summary["kept_total"], "outliers_treated": None, "mean_overlap_with_baseline": None}


def _write_dropmap(ctx: StageContext, result, profile: Profile) -> dict:
    cfg = ctx.cfg
    engine.write(ctx.out_dir, result, title=f"{cfg.strategy.name} / {cfg.class_weights.name} / {cfg.floor_clamp.name}")
    s = result.summary
    overlap = s["baseline"]["mean_overlap"] if s["baseline"] else None
    return {"keep_per_layer": s["keep_per_layer"], "num_experts": profile.num_experts, "kept_total": s["kept_total"],
            "outliers_treated": s["outliers"]["treated"], "mean_overlap_with_baseline": overlap}


def stage_map(ctx: StageContext, model_path: Path, physical: bool) -> DropMap:
    """The dropmap stage's map, checked against the model it is applied to."""
    return map_for_model(ctx.inputs["dropmap"] / DROP_MAP_FILE, model_path, physical)


def map_for_model(path: Path, model_path: Path, physical: bool, layers: list[int] | None = None) -> DropMap:
    """The drop map JSON at `path`, parsed once against the model at `model_path` (DropMap.for_model)."""
    config = read_config(model_path)
    adapter = adapter_for(config)
    return DropMap.read(path, lambda m: DropMap.for_model(m, adapter, config, physical=physical, layers=layers))


_DROPMAP_FILES = {"floor_clamp.profile": ("floor profile artifact dir", "to rank the floor by the run's own profile"),
                  "floor_clamp.map": ("floor map JSON", "to run without it"),
                  "keep.baseline_map": ("baseline drop map JSON", "to run without it"),
                  "keep.drop_map": ("drop map JSON", "to build the map from the recipe")}


def dropmap_inputs(cfg: DictConfig) -> dict[str, Path]:
    """The recipe's files, hashed into the cache key. Published recipes name the reference's files
    (v4_layer_floor_map.json ...): say which knob points at a file that is not there."""
    out = {}
    for key, (what, without) in _DROPMAP_FILES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if not Path(value).exists():
            raise MoePruneError(f"{key}={value}: not found; expected a {what} (pass {key}=PATH, or {key}=null "
                                f"{without})")
        is_dir = what.endswith("dir")
        if Path(value).is_dir() != is_dir:
            hint = f" (a dropmap artifact holds {Path(value) / 'drop_map.json'})" if key.startswith("keep.") else ""
            raise MoePruneError(f"{key}={value} is a {'file' if is_dir else 'directory'}: expected a {what}{hint}")
        out[key] = Path(value)
    return out


def recipe_fits(cfg: DictConfig) -> None:
    """The recipe's own mistakes (a knob, a class name, a keep count the model cannot take) are
    known from the config and the model's config.json: say them before the profile is computed."""
    dropmap_inputs(cfg)  # the recipe's files exist and are what each knob expects
    given = given_profile(cfg)
    if given is not None:  # no model needed: its classes, experts and top_k are the profile's
        profiled_config(cfg)  # a recorded config.json that cannot be read: said before any stage
        if cfg.keep.drop_map is None:
            rule = engine.keep_rule(keep(cfg), given.num_experts, recorded_top_k(cfg, given))
            _floor_fits(cfg, given.layers, given.num_experts, rule.per_layer)
        engine.class_weight_vector(given.classes, recipe(cfg).class_weights, class_weight_presets)
        return
    if cfg.keep.drop_map is not None:  # the map fits the model: known before any profile
        given_map(cfg)
    else:
        model_config = read_config(model_dir(cfg))
        adapter = adapter_for(model_config)
        engine.fit_keep_to_model(keep(cfg), adapter, model_config)
        rule = engine.keep_rule(keep(cfg), adapter.num_experts(model_config), adapter.top_k(model_config))
        _floor_fits(cfg, check_checkpoint(model_dir(cfg)), adapter.num_experts(model_config), rule.per_layer)
    engine.class_weight_vector(list(cfg.calibration.classes), recipe(cfg).class_weights, class_weight_presets)


def _floor_fits(cfg: DictConfig, layers: list[int], num_experts: int, keep_per_layer: int) -> None:
    """The floor's knobs against the keep count and the layers (a band above keep, a floor map's
    counts), which need no profile: the floor computed on placeholder scores, only for its checks."""
    floor_clamp = recipe(cfg).floor_clamp
    if floor.is_active(floor_clamp):
        floor.floor_counts(floor_clamp, layers, keep_per_layer, np.ones((len(layers), num_experts)))
        if floor_clamp.profile is not None:  # the user's profile dir: its contents, before any stage
            engine.floor_profile(floor_clamp, layers, num_experts, recipe(cfg).strategy.reference_needs())
