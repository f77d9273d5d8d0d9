"""Per-layer floors: F_l experts per layer that a floor ranking guarantees (docs/recipes.md, "floor_clamp").

The floor ranking is the pooled score f[l, e] = max over the floor profile's classes of the
reference score (alpha * wnorm + count, same outlier treatment), from another profile (the
reference used its earlier five-class v4 data) or from the run's own. The count F_l comes from a
floor map file, a scalar `top`, or a band [lo, hi] into which a per-layer signal is rescaled
linearly, so layers that matter more get a larger floor.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np

from moeprune import artifacts
from moeprune.errors import MoePruneError

if TYPE_CHECKING:
    from moeprune.config import FloorClampConfig

_SIGNAL_KEY = re.compile(r"^top\d+_mean_per_layer$")


def is_active(cfg: FloorClampConfig) -> bool:
    return any(getattr(cfg, k) is not None for k in ("map", "top", "band", "band_ratio"))


def floor_scores(stats: dict[str, np.ndarray], strategy, classes: list[str]) -> np.ndarray:
    from moeprune.prune.strategies.base import treat_outliers

    s, _ = treat_outliers(strategy.reference_score(stats), strategy.outlier_signal(stats), strategy.outlier_mode,
                          strategy.outlier_threshold, classes)
    return s.max(axis=0)


def _layer_values(obj, what: str, path: str, layers: list[int], integer: bool) -> np.ndarray:
    if not isinstance(obj, dict):
        raise MoePruneError(f"floor map {path}: {what} must be an object {{layer: value}}, got {type(obj).__name__}")
    try:
        got = {int(k): v for k, v in obj.items()}
    except ValueError:
        raise MoePruneError(f"floor map {path}: {what} has a key that is not a layer index: {sorted(obj)}") from None
    if sorted(got) != sorted(layers):
        raise MoePruneError(f"floor map {path}: {what} covers layers {sorted(got)}, expected the profile's MoE layers {layers}")
    out = []
    for layer in layers:
        v = got[layer]
        ok = isinstance(v, int) and v >= 0 if integer else isinstance(v, (int, float)) and math.isfinite(v)
        if isinstance(v, bool) or not ok:
            expected = "an integer >= 0" if integer else "a finite number"
            raise MoePruneError(f"floor map {path}: {what}[{layer}]={v!r}: expected {expected}")
        out.append(v)
    return np.array(out, dtype=np.int64 if integer else np.float64)


def read_floor_map(path: str, layers: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (floor count per layer, optional per-layer signal such as `top98_mean_per_layer`)."""
    try:
        obj = artifacts.read_json(path)
    except FileNotFoundError:
        raise MoePruneError(f"floor map not found: {path}: expected the floor map JSON that floor_clamp.map names "
                            f"(floor_clamp.map=null runs without it)") from None
    except ValueError as e:
        raise MoePruneError(f"floor map {path} is not valid JSON: {e}") from None
    if isinstance(obj, dict) and "floor_per_layer" in obj:
        counts = _layer_values(obj["floor_per_layer"], "floor_per_layer", path, layers, integer=True)
        keys = [k for k in obj if _SIGNAL_KEY.match(k)]
        if len(keys) > 1:
            raise MoePruneError(f"floor map {path}: several per-layer signals {keys}: expected at most one")
        signal = _layer_values(obj[keys[0]], keys[0], path, layers, integer=False) if keys else None
        return counts, signal
    return _layer_values(obj, "the flat map", path, layers, integer=True), None


def _band(cfg: FloorClampConfig, keep: int) -> tuple[int, int] | None:
    if cfg.band is not None and cfg.band_ratio is not None:
        raise MoePruneError("floor_clamp: set band or band_ratio, not both")
    if cfg.band is not None:
        band = list(cfg.band)
        if len(band) != 2 or not 0 <= band[0] <= band[1] <= keep:
            raise MoePruneError(f"floor_clamp.band={band}: expected [lo, hi] with 0 <= lo <= hi <= keep ({keep}); "
                               "for another keep count use a ratio band (floor_clamp=ratio_24_40 scales [24, 40] of "
                               "98 to it)")
        return int(band[0]), int(band[1])
    if cfg.band_ratio is not None:
        r = list(cfg.band_ratio)
        if len(r) != 2 or not 0 <= r[0] <= r[1] <= 1:
            raise MoePruneError(f"floor_clamp.band_ratio={r}: expected [lo, hi] with 0 <= lo <= hi <= 1")
        return int(round(r[0] * keep)), int(round(r[1] * keep))
    return None


def floor_counts(cfg: FloorClampConfig, layers: list[int], keep: int, scores: np.ndarray | None) -> np.ndarray:
    """F_l per layer; `keep` is the per-layer keep count, `scores` the pooled floor scores [L, E]."""
    if cfg.map is not None and cfg.top is not None:
        raise MoePruneError("floor_clamp: set map or top, not both (a map gives one count per layer, top one for all)")
    counts, signal = read_floor_map(cfg.map, layers) if cfg.map is not None else (None, None)
    band = _band(cfg, keep)
    if cfg.top is not None:
        if not 0 <= cfg.top <= keep:
            raise MoePruneError(f"floor_clamp.top={cfg.top}: expected 0 <= top <= keep ({keep})")
        if band is not None:
            raise MoePruneError("floor_clamp: top is one count for every layer, a band rescales per-layer values: set one")
        counts = np.full(len(layers), int(cfg.top))
    if band is not None:
        lo, hi = band
        if signal is None:  # the map's counts, else the mean pooled score of each layer's top-`keep` experts
            signal = counts.astype(np.float64) if counts is not None else np.sort(scores, axis=1)[:, -keep:].mean(1)
        span = signal.max() - signal.min()
        # rint rounds half to even, as Python's round does; the product before the division, as the
        # reference computes it (the other order can round a value to the other side of .5);
        # equal signals give every layer the middle.
        scaled = lo + (hi - lo) * (signal - signal.min()) / span if span > 0 else np.full(len(layers), (lo + hi) / 2)
        counts = np.clip(np.rint(scaled), lo, hi).astype(np.int64)
    too_big = [(layer, int(n)) for layer, n in zip(layers, counts) if n > keep]
    if too_big:
        raise MoePruneError(f"floor_clamp: floors {too_big} (layer, floor) exceed the keep count {keep}: "
                            f"expected floors <= keep (clamp them with floor_clamp.band)")
    return counts
