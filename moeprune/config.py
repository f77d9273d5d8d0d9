"""Typed schema of the composed run config, registered in Hydra's ConfigStore.

`conf/run.yaml` lists `run_schema` first in its defaults, so every group preset (`conf/<group>/*.yaml`)
is merged into the dataclass below: a misspelt key or a value of the wrong type fails at compose
time with the full key named. YAML files are the user-facing presets; these classes are the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# ---- model / calibration (profile stage) ------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # a local checkpoint dir or a Hugging Face id (resolved offline from the HF cache)
    revision: Optional[str] = None
    dtype: str = "float32"  # compute dtype for profiling / hf evaluation: float32 | bfloat16 | float16
    device: str = "auto"  # auto = cuda when available, else cpu
    trust_remote_code: bool = False


@dataclass
class CalibrationConfig:
    name: str = MISSING
    source: str = "toy"  # toy: the shipped toy world's calibration split
    classes: List[str] = field(default_factory=list)  # empty = every class of the source
    samples_per_class: int = 64
    max_tokens: int = 128
    batch_size: int = 64
    seed: int = 0


# ---- drop map ----------------------------------------------------------------------------------
@dataclass
class StrategyConfig:
    _target_: str = MISSING
    name: str = MISSING
    normalize: str = "rank"  # rank | mean | none
    alpha: float = 2.0  # multiplier of the contribution term: score = alpha * wnorm + tc
    score: str = "legacy"  # legacy: alpha*wnorm + tc | mean: alpha*wnorm
    breadth_bonus: float = 0.0
    protect_top: int = 0
    seed: int = 0


@dataclass
class ClassWeightsConfig:
    name: str = MISSING
    weights: Dict[str, float] = field(default_factory=dict)  # class -> weight; unlisted classes get `default`
    default: float = 1.0


@dataclass
class FloorClampConfig:
    name: str = MISSING
    band: Optional[List[int]] = None  # [lo, hi] experts per layer guaranteed by the floor ranking


@dataclass
class KeepConfig:
    experts_per_layer: Optional[int] = None  # exact count kept per layer; overrides drop_fraction
    drop_fraction: float = 0.25


# ---- surgery / quant ---------------------------------------------------------------------------
@dataclass
class PruneConfig:
    shared_ffn_alpha: float = 1.0  # multiply the shared/dense FFN down projection by this
    max_shard_bytes: int = 5_000_000_000


@dataclass
class QuantTierConfig:
    name: str = "none"


# ---- evaluation --------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    _target_: str = MISSING
    name: str = MISSING
    n_per_class: int = 100
    split: str = "test"
    seed: int = 0


@dataclass
class BackendConfig:
    name: str = MISSING
    batch_size: int = 128
    max_new_tokens: Optional[int] = None  # None: the bench's own limit


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "moeprune"
    mode: str = "offline"


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class StagesConfig:
    profile: bool = True
    dropmap: bool = True
    prune: bool = True
    quant: bool = True  # only runs when quant_tier is not none
    evaluate: bool = True
    evaluate_base: bool = True


@dataclass
class PathsConfig:
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class CacheConfig:
    refresh: bool = False  # rebuild every stage even when its artifact is cached
    verify_large_files: bool = False  # hash big model files whole instead of size + head + tail


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    calibration: CalibrationConfig = MISSING
    strategy: StrategyConfig = MISSING
    class_weights: ClassWeightsConfig = MISSING
    floor_clamp: FloorClampConfig = MISSING
    quant_tier: QuantTierConfig = MISSING
    bench: BenchConfig = MISSING
    backend: BackendConfig = MISSING
    logger: LoggerConfig = MISSING
    keep: KeepConfig = field(default_factory=KeepConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    stage: str = "all"  # all | profile | dropmap | prune | quant | evaluate
    optimized_metric: Optional[str] = "evaluate.score"  # what a sweep optimizes (dotted path into results)
    seed: int = 0
    extras: Dict[str, Any] = field(default_factory=dict)


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
