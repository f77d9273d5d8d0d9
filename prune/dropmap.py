"""Drop maps: from a profile and a recipe to {layer: sorted dropped expert ids}.

The JSON schema is the reference tools' own ({"<layer>": [ids]}), so maps move both ways.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.prune.profile import Profile

DROP_MAP_FILE = "drop_map.json"
SUMMARY_FILE = "summary.json"


def keep_count(keep_cfg: DictConfig, num_experts: int) -> int:
    if keep_cfg.experts_per_layer is not None:
        return int(keep_cfg.experts_per_layer)
    if not 0.0 <= keep_cfg.drop_fraction < 1.0:
        raise MoePruneError(f"keep.drop_fraction={keep_cfg.drop_fraction}: expected 0 <= fraction < 1")
    return num_experts - int(round(num_experts * keep_cfg.drop_fraction))


def class_weight_vector(classes: list[str], cfg: DictConfig) -> np.ndarray:
    unknown = sorted(set(cfg.weights) - set(classes))
    if unknown:
        raise MoePruneError(
            f"class_weights={cfg.name}: unknown classes {unknown}; the profile has {classes}"
        )
    w = np.array([float(cfg.weights.get(c, cfg.default)) for c in classes])
    if (w < 0).any() or w.sum() <= 0:
        raise MoePruneError(f"class_weights={cfg.name}: weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w


def select_drops(agg: np.ndarray, keep: int, protect_top: int = 0) -> list[list[int]]:
    """Per layer: protect the top `protect_top` by agg, then drop the lowest agg (ties: lower id first)."""
    L, E = agg.shape
    drops = []
    for l in range(L):
        protected = set(np.argsort(-agg[l], kind="stable")[:min(protect_top, keep)].tolist())
        order = [e for e in np.argsort(agg[l], kind="stable").tolist() if e not in protected]
        drops.append(sorted(order[:E - keep]))
    return drops


def build(profile: Profile, cfg: DictConfig) -> tuple[dict[str, list[int]], dict]:
    strategy = hydra.utils.instantiate(cfg.strategy, _convert_="all")
    keep = keep_count(cfg.keep, profile.num_experts)
    stats = {k: v.double().numpy() for k, v in profile.stats.items()}
    weights = class_weight_vector(profile.classes, cfg.class_weights)
    agg = strategy.keep_scores(stats, weights)
    drops = select_drops(agg, keep, strategy.protect_top)
    drop_map = {str(layer): d for layer, d in zip(profile.layers, drops)}
    summary = {
        "keep_per_layer": keep,
        "num_experts": profile.num_experts,
        "layers": {
            str(layer): {
                "agg_min": float(agg[i].min()), "agg_max": float(agg[i].max()), "agg_mean": float(agg[i].mean()),
                "dropped": len(drops[i]),
            }
            for i, layer in enumerate(profile.layers)
        },
    }
    return drop_map, summary


def validate(drop_map: dict, layers: list[int], num_experts: int, top_k: int) -> dict[int, list[int]]:
    """Check a drop map against a model; return it with int keys."""
    if not isinstance(drop_map, dict):
        raise MoePruneError(f"drop map must be a JSON object {{layer: [expert ids]}}, got {type(drop_map).__name__}")
    out = {}
    for key, ids in drop_map.items():
        try:
            layer = int(key)
        except ValueError:
            raise MoePruneError(f"drop map key {key!r} is not a layer index") from None
        if layer not in layers:
            raise MoePruneError(f"drop map names layer {layer}, but the model's MoE layers are {layers}")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise MoePruneError(f"drop map layer {layer}: expected a list of integer expert ids")
        if len(set(ids)) != len(ids):
            raise MoePruneError(f"drop map layer {layer}: duplicate expert ids {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        bad = [i for i in ids if not 0 <= i < num_experts]
        if bad:
            raise MoePruneError(f"drop map layer {layer}: expert ids {bad} out of range 0..{num_experts - 1}")
        if num_experts - len(ids) < top_k:
            raise MoePruneError(
                f"drop map layer {layer} keeps {num_experts - len(ids)} experts, fewer than top_k={top_k}"
            )
        out[layer] = sorted(ids)
    kept = {num_experts - len(v) for v in out.values()} | ({num_experts} if len(out) < len(layers) else set())
    if len(kept) > 1:
        raise MoePruneError(f"drop map keeps different expert counts per layer {sorted(kept)}: expected one count")
    return out


def load(path: Path) -> dict:
    try:
        return artifacts.read_json(path)
    except FileNotFoundError:
        raise MoePruneError(f"drop map not found: {path}") from None
    except ValueError as e:
        raise MoePruneError(f"drop map {path} is not valid JSON: {e}") from None
