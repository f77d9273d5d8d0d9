"""Drop maps: from a profile and a recipe to {layer: sorted dropped expert ids} (docs/recipes.md).

build() follows the reference recipe: strategy scores -> protection set (protect_top, each
class's top-K, the floor) -> drop the lowest-scoring unprotected experts, ties broken by the
strategy's rank_ties rule (prune/selection.py: the reference's stable sort by expert id, or the
baseline map's dropped experts first and then the lower id).
Under group-limited routing (DeepSeek-V3) the uniform selection is made group by group so that
the map is legal (selection.select_grouped). The map itself and its one validator: moeprune/dropmap.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from moeprune import artifacts
from moeprune import config
from moeprune.config import ClassWeightsConfig, FloorClampConfig, KeepConfig
from moeprune.errors import MoePruneError
from moeprune.prune import floor
from moeprune.dropmap import DropMap
from moeprune.prune.selection import Protection, protect, select_budget, select_grouped, select_uniform
from moeprune.profile import Profile, rebuild_hint

DROP_MAP_FILE = "drop_map.json"
SUMMARY_FILE = "summary.json"
HEATMAP_FILE = "keep_heatmap.png"


# ---- recipe inputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeepRule:
    """How many experts each MoE layer keeps: `per_layer` (uniform), or `per_layer` x layers spread
    by score with every layer within [lo, hi] (budget)."""

    mode: str  # uniform | budget
    per_layer: int
    lo: int
    hi: int


def keep_rule(keep_cfg: KeepConfig, num_experts: int, top_k: int) -> KeepRule:
    """The keep node resolved against a model's expert count and top_k (the only place it is)."""
    if top_k > num_experts:  # the checkpoint's config.json is inconsistent: no keep count could fit
        raise MoePruneError(f"the model's config.json routes each token to top_k={top_k} experts of num_experts="
                            f"{num_experts}: expected top_k <= num_experts (its top_k_experts / num_experts_per_tok "
                            "and num_experts disagree; the keep settings are not the cause)")
    if keep_cfg.experts_per_layer is not None:
        T = int(keep_cfg.experts_per_layer)
    elif not 0.0 <= keep_cfg.drop_fraction < 1.0:
        raise MoePruneError(f"keep.drop_fraction={keep_cfg.drop_fraction}: expected 0 <= fraction < 1")
    else:
        T = num_experts - int(round(num_experts * keep_cfg.drop_fraction))
    if keep_cfg.mode == "uniform":
        if keep_cfg.min_per_layer is not None or keep_cfg.max_per_layer is not None:
            raise MoePruneError("keep.min_per_layer / keep.max_per_layer apply to keep.mode=budget only")
        lo = hi = T
    elif keep_cfg.mode == "budget":
        lo = top_k if keep_cfg.min_per_layer is None else int(keep_cfg.min_per_layer)
        hi = num_experts if keep_cfg.max_per_layer is None else int(keep_cfg.max_per_layer)
    else:
        raise MoePruneError(f"keep.mode={keep_cfg.mode!r}: expected uniform or budget")
    if not top_k <= lo <= T <= hi <= num_experts:
        what = f"{T} experts per layer" if lo == hi else f"{T} experts per layer on average within [{lo}, {hi}]"
        raise MoePruneError(f"cannot keep {what}: expected top_k ({top_k}) <= min <= keep <= max <= "
                            f"num_experts ({num_experts})")
    return KeepRule(str(keep_cfg.mode), T, lo, hi)


def fit_keep_to_model(keep_cfg: KeepConfig, adapter, config_dict: dict) -> tuple[int, list] | None:
    """Refuse a keep rule the architecture cannot run with; returns its group-limited routing
    rule (adapter.expert_groups), if any, for build()."""
    rule = keep_rule(keep_cfg, adapter.num_experts(config_dict), adapter.top_k(config_dict))
    if rule.mode == "uniform":
        adapter.validate_keep(config_dict, rule.per_layer)
    groups = adapter.expert_groups(config_dict, rule.per_layer)
    check_mode_fits_groups(rule.mode, groups)
    return groups


def check_mode_fits_groups(mode: str, groups) -> None:
    """Group-limited routing (the adapter's expert_groups) takes uniform maps only."""
    if groups is not None and mode != "uniform":
        raise MoePruneError(f"keep.mode={mode} cannot follow group-limited routing (n_group={groups[0]}): expected "
                            "keep.mode=uniform, whose maps are chosen legal group by group")


# The class_weights presets as {name: weights}, asked for only to name the ones that fit a profile
# when a recipe names a class it lacks (the stage reads them through Hydra: moeprune.presets).
WeightPresets = Callable[[], Mapping[str, Mapping[str, float]]]


def class_weight_vector(classes: list[str], class_weights: ClassWeightsConfig,
                        weight_presets: Optional[WeightPresets] = None) -> np.ndarray:
    cfg = class_weights
    unknown = sorted(set(cfg.weights) - set(classes))
    if unknown:
        hint = ""
        fitting = fitting_weight_presets(classes, weight_presets) if weight_presets else []
        if fitting:
            hint = f"; presets that fit: class_weights={' / '.join(fitting)}"
        raise MoePruneError(f"class_weights={cfg.name}: unknown classes {unknown}; the profile has {classes}{hint}")
    w = np.array([float(cfg.weights.get(c, cfg.default)) for c in classes])
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise MoePruneError(f"class_weights={cfg.name}: weights must be finite, >= 0 and not all 0; got "
                            f"{dict(zip(classes, w.tolist()))}")
    return w


def fitting_weight_presets(classes: list[str], weight_presets: WeightPresets) -> list[str]:
    """The class_weights presets that name only these classes."""
    return sorted(name for name, weights in weight_presets().items() if set(weights) <= set(classes))


def check_profile(profile: Profile, needs: tuple[str, ...], what: str = "profile") -> dict[str, np.ndarray]:
    """The profile's statistics as float64 arrays; refuse a class that is all zero or mostly
    non-finite in a layer (a broken calibration pass, not a signal)."""
    missing = [k for k in needs if k not in profile.stats]
    if missing:
        raise MoePruneError(f"{what} lacks statistics {missing} (it has {sorted(profile.stats)}): expected "
                            f"{list(needs)}")
    stats = {k: v.double().numpy() for k, v in profile.stats.items()}
    shape = (len(profile.classes), len(profile.layers), profile.num_experts)
    for k in needs:
        if stats[k].shape != shape:
            raise MoePruneError(f"{what}: {k} has shape {tuple(stats[k].shape)}, expected (classes, layers, experts) "
                                f"{shape} for its {len(profile.classes)} classes {profile.classes} in profile.json "
                                f"({rebuild_hint(profile.source, profile.given_by)})")
    checked = [stats[k] for k in ("count", "wnorm") if k in stats and stats[k].shape == shape]
    for c, name in enumerate(profile.classes if checked else []):
        nonfinite = np.any([~np.isfinite(x[c]) for x in checked], axis=0).mean(axis=1) > 0.5
        zero = np.all([x[c] == 0 for x in checked], axis=0).all(axis=1)
        for bad, why in ((zero, "all zero"), (nonfinite, "mostly non-finite")):
            if bad.any():
                layers = [profile.layers[i] for i in np.nonzero(bad)[0]]
                raise MoePruneError(f"{what}: class {name!r} is {why} in layers {layers}: expected routing "
                                    f"statistics for every class in every layer "
                                    f"({rebuild_hint(profile.source, profile.given_by)})")
    return stats


# ---- the recipe ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """What build() reads: the built strategy and the class_weights, floor_clamp and keep settings,
    as their schemas' dataclasses (moeprune/config.py). `of` is where the four config nodes are read."""

    strategy: Any  # a prune.strategies Strategy
    class_weights: ClassWeightsConfig
    floor_clamp: FloorClampConfig
    keep: KeepConfig
    settings: dict  # the four nodes as plain data: the summary's record of the recipe
    weight_presets: Optional[WeightPresets] = None  # named in the error for a class the profile lacks

    @classmethod
    def of(cls, strategy: DictConfig, class_weights: DictConfig, floor_clamp: DictConfig, keep: DictConfig,
           weight_presets: Optional[WeightPresets] = None) -> "Recipe":
        nodes = {"strategy": strategy, "class_weights": class_weights, "floor_clamp": floor_clamp, "keep": keep}
        return cls(config.build(strategy), config.typed(class_weights, ClassWeightsConfig),
                   config.typed(floor_clamp, FloorClampConfig), config.typed(keep, KeepConfig),
                   {k: OmegaConf.to_container(v, resolve=True) for k, v in nodes.items()}, weight_presets)


@dataclass
class BuildResult:
    layers: list[int]
    num_experts: int
    dropped: list[list[int]]  # per MoE layer, sorted
    agg: np.ndarray  # [L, E] keep scores
    protected: list[set[int]]
    summary: dict

    def as_json(self) -> dict[str, list[int]]:
        return {str(layer): d for layer, d in zip(self.layers, self.dropped)}


def floor_profile(floor_clamp: FloorClampConfig, layers: list[int], num_experts: int, needs) -> tuple[list[str], dict]:
    """The user's floor profile (floor_clamp.profile), read and checked against the run's layers and
    experts; each error names the knob and the dir. The preflight calls it before any stage."""
    knob = f"floor_clamp.profile={floor_clamp.profile}"
    try:
        other = Profile.load(Path(floor_clamp.profile), given_by="floor_clamp.profile")
        if other.layers != list(layers) or other.num_experts != num_experts:
            raise MoePruneError(f"layers {other.layers} x {other.num_experts} experts, expected the run's "
                                f"{list(layers)} x {num_experts}")
        return other.classes, check_profile(other, needs, "the floor profile")
    except MoePruneError as e:
        raise MoePruneError(f"{knob}: {e} (floor_clamp.profile=null ranks the floor by the run's own profile)") from None


def _floor_profile(floor_clamp: FloorClampConfig, profile: Profile, stats: dict, needs) -> tuple[list[str], dict]:
    if floor_clamp.profile is None:
        return profile.classes, stats
    return floor_profile(floor_clamp, profile.layers, profile.num_experts, needs)


def build(profile: Profile, recipe: Recipe, top_k: int, groups: tuple[int, list[tuple[int, int]]] | None = None) -> BuildResult:
    """The drop map for `profile` under `recipe`. `groups` (n_group, legal shapes) is the adapter's
    group-limited routing rule, if any."""
    strategy, keep_cfg = recipe.strategy, recipe.keep
    stats = check_profile(profile, strategy.needs)
    L, E = len(profile.layers), profile.num_experts
    weights = class_weight_vector(profile.classes, recipe.class_weights, recipe.weight_presets)
    scores = strategy.scores(stats, weights, profile.classes)
    if not np.isfinite(scores.agg).all():
        raise MoePruneError(f"strategy={strategy.name} produced non-finite keep scores: check the profile and knobs")
    baseline = None
    if keep_cfg.baseline_map is not None:
        try:
            baseline = _read_map(keep_cfg.baseline_map, profile, top_k, physical=False)
        except MoePruneError as e:
            raise MoePruneError(f"keep.baseline_map: {e} (keep.baseline_map=null runs without it)") from None
    bases = [set(baseline[layer]) if baseline else set() for layer in profile.layers]
    if keep_cfg.drop_map is not None:  # a map made elsewhere (e.g. the reference tools): used as is, and scored
        imported = _read_map(keep_cfg.drop_map, profile, top_k, physical=keep_cfg.mode == "uniform")
        dropped = [imported[layer] for layer in profile.layers]
        protections = [Protection(set(), {}) for _ in range(L)]
        summary = _summary(profile, recipe, weights, scores, protections, dropped, bases if baseline else None,
                           None, E - len(dropped[0]))
        return BuildResult(profile.layers, E, dropped, scores.agg, [set() for _ in range(L)],
                           {"imported_from": str(keep_cfg.drop_map), **summary})
    rule = keep_rule(keep_cfg, E, top_k)

    floor_scores = floor_n = None
    if floor.is_active(recipe.floor_clamp):
        classes, fstats = _floor_profile(recipe.floor_clamp, profile, stats, strategy.reference_needs())
        floor_scores = floor.floor_scores(fstats, strategy, classes)
        floor_n = floor.floor_counts(recipe.floor_clamp, profile.layers, rule.per_layer, floor_scores)
    elif recipe.floor_clamp.profile is not None:
        raise MoePruneError("floor_clamp.profile is set but no floor count: set floor_clamp.map, top, band or band_ratio")

    ties = strategy.rank_ties
    protections = [protect(l, scores.agg, scores.per_class, weights, strategy.protect_top, strategy.protect_class_top,
                           floor_scores, 0 if floor_n is None else int(floor_n[l]), rule.hi, bases[l], ties)
                   for l in range(L)]
    grouping = None
    check_mode_fits_groups(rule.mode, groups)
    if groups is not None:
        dropped, grouping = select_grouped(scores.agg, protections, bases, *groups, ties=ties)
    elif rule.mode == "budget":
        dropped = select_budget(scores.agg, protections, bases, rule.per_layer, rule.lo, rule.hi, ties)
    else:
        dropped = select_uniform(scores.agg, protections, bases, rule.per_layer, ties)
    summary = _summary(profile, recipe, weights, scores, protections, dropped, bases if baseline else None,
                       floor_n, rule.per_layer)
    summary["groups"] = grouping
    return BuildResult(profile.layers, E, dropped, scores.agg, [p.experts for p in protections], summary)


def _read_map(path, profile: Profile, top_k: int, physical: bool) -> DropMap:
    return DropMap.read(path, lambda m: DropMap.parse(m, num_experts=profile.num_experts, top_k=top_k,
                                                      layers=profile.layers, physical=physical))


def _summary(profile, recipe: Recipe, weights, scores, protections, dropped, bases, floor_n, keep) -> dict:
    layers, E, strategy, mode = profile.layers, profile.num_experts, recipe.strategy, recipe.keep.mode
    treated = scores.outliers if strategy.outlier_mode != "keep" else []
    outliers_per_layer = np.bincount([o.layer for o in treated], minlength=len(layers))
    per_layer = {}
    for l, layer in enumerate(layers):
        a, d = scores.agg[l], dropped[l]
        kept = [e for e in range(E) if e not in set(d)]
        edge = float(a[d].max()) if d else None
        # kept experts scoring within 1% of the best dropped one (protected experts below it do not count)
        ties = sum(1 for e in kept if 0 <= a[e] - edge <= 0.01 * abs(edge)) if d else 0
        per_layer[str(layer)] = {
            "kept": len(kept), "dropped": len(d),
            "agg_min": float(a.min()), "agg_max": float(a.max()), "agg_mean": float(a.mean()),
            "boundary_ties_within_1pct": ties,
            "protected": len(protections[l].experts), "protected_by": protections[l].by,
            "floor": None if floor_n is None else int(floor_n[l]),
            "overlap_with_baseline": None if bases is None else len(set(d) & bases[l]),
            "outliers_treated": int(outliers_per_layer[l]),
        }
    overlaps = [v["overlap_with_baseline"] for v in per_layer.values()]
    return {
        "num_experts": E,
        "keep_mode": mode,
        "keep_per_layer": keep if mode == "uniform" else {k: v["kept"] for k, v in per_layer.items()},
        "kept_total": sum(v["kept"] for v in per_layer.values()),
        "classes": profile.classes,
        "class_weights": dict(zip(profile.classes, weights.tolist())),
        "recipe": recipe.settings,
        "outliers": {"mode": strategy.outlier_mode, "threshold": strategy.outlier_threshold,
                     "treated": len(treated),
                     "found": len(scores.outliers), "cells": [o.as_dict(layers) for o in scores.outliers[:100]]},
        "baseline": None if bases is None else {
            "path": str(recipe.keep.baseline_map), "mean_overlap": float(np.mean(overlaps)),
            "min_overlap": min(overlaps), "max_overlap": max(overlaps)},
        "layers": per_layer,
    }


def write(out_dir: Path, result: BuildResult, title: str = "") -> None:
    """drop_map.json, summary.json and the keep heatmap (inside a stage's temp dir: all or nothing)."""
    from moeprune.prune.heatmap import save_keep_heatmap

    out_dir = Path(out_dir)
    artifacts.write_json(out_dir / DROP_MAP_FILE, result.as_json())
    artifacts.write_json(out_dir / SUMMARY_FILE, result.summary)
    save_keep_heatmap(out_dir / HEATMAP_FILE, result.agg, result.dropped, result.protected, result.layers, title)
