"""Typed schema of the composed run config, registered in Hydra's ConfigStore.

`conf/run.yaml` lists `run_schema` first in its defaults, so every group preset (`conf/<group>/*.yaml`)
is merged into the dataclass below: a misspelt key or a value of the wrong type fails at compose
time with the full key named. The strategy, bench, backend, logger and quant_tier groups are typed
by each preset's own schema, which sits beside its class (moeprune/schema.py). YAML files are the user-facing presets; these classes
are the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from moeprune import schema
from moeprune.schema import Choice, knob


class Dtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class SourceKind(Choice):
    jsonl = "jsonl"
    text = "text"  # one prompt per line
    toy = "toy"  # the toy world
    datasets = "datasets"


class Overflow(Choice):
    truncate = "truncate"  # warn
    window = "window"  # consecutive windows
    error = "error"


class ScoreTokens(Choice):
    all = "all"
    completion = "completion"


class ProfileMode(Choice):
    auto = "auto"
    whole = "whole"
    layerwise = "layerwise"


class OnNonfinite(Choice):
    error = "error"
    skip = "skip"


class KeepMode(Choice):
    uniform = "uniform"
    budget = "budget"


class MtpHeads(Choice):
    keep = "keep"
    drop = "drop"


# ---- model / calibration (profile stage) ------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # a local checkpoint dir or a Hugging Face id (resolved offline from the HF cache)
    revision: Optional[str] = None
    dtype: Dtype = Dtype.float32  # compute dtype for profiling / hf evaluation
    device: str = "auto"  # auto = cuda when available, else cpu


@dataclass
class CalibrationSourceConfig:
    """Where one class's prompts come from (docs/profiling.md)."""

    kind: SourceKind = SourceKind.jsonl
    path: str = ""  # the file; datasets: a dataset id or local dir; toy: the toy class (default: this class)
    field: str = "text"  # jsonl / datasets: the key with the text, or a chat `messages` list
    split: str = "train"  # datasets split (toy: always its calib split)
    subset: Optional[str] = None  # datasets config name
    tier: str = "short"  # a key of calibration.tiers
    limit: Optional[int] = None  # at most this many prompts from this source


@dataclass
class CalibrationTierConfig:
    max_tokens: int = 128  # prompt tokens per pass (the generated continuation comes on top)
    weight: float = 1.0  # multiplies every statistic of this tier's passes
    overflow: Overflow = Overflow.truncate  # what a longer prompt gets


@dataclass
class CalibrationConfig:
    name: str = MISSING
    data_dir: Optional[str] = None  # where a preset's files live: its paths say ${calibration.data_dir}/...
    classes: Dict[str, List[CalibrationSourceConfig]] = field(default_factory=dict)  # class -> sources
    tiers: Dict[str, CalibrationTierConfig] = field(default_factory=lambda: {"short": CalibrationTierConfig()})
    # at most this many prompts per class (None: all)
    samples_per_class: Optional[int] = knob(64, lambda v: v >= 1, "at least 1 prompt per class, or null for all")
    chat_template: bool = False  # wrap each prompt as a user turn through the tokenizer's chat template
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: true}
    # greedy continuation profiled with the prompt (the reference: 128)
    generate_tokens: int = knob(0, lambda v: v >= 0, "0 or more generated tokens")
    # all: every token of a pass feeds the statistics (the reference). completion: the whole pass
    # is forwarded but only answer-producing positions count (from the prompt's last token on);
    # needs sources that know where the answer starts (toy) or generate_tokens > 0.
    score_tokens: ScoreTokens = ScoreTokens.all
    batch_size: int = knob(64, lambda v: v >= 1, "at least 1 pass per forward")  # passes per forward
    # padded tokens per forward (batches are grouped by length)
    batch_tokens: int = knob(65536, lambda v: v >= 1, "at least 1 padded token per forward")
    seed: int = 0


@dataclass
class ProfileConfig:
    # a profile artifact dir to use instead of profiling the model (`python -m moeprune.prune.profile
    # import` makes one from the reference's JSON); stage=dropmap then needs no model (docs/recipes.md)
    path: Optional[str] = None
    # auto: layerwise when the weights exceed device_memory_fraction of the GPU, else whole (CPU: whole)
    mode: ProfileMode = ProfileMode.auto  # layerwise: one decoder layer on the device at a time
    neuron_energy: bool = False  # also sum squared intermediate activations per (expert, neuron)
    on_nonfinite: OnNonfinite = OnNonfinite.error  # skip: exclude non-finite rows, count them in `nonfinite`
    progress: bool = True  # tqdm bar with tokens/s
    # auto: layerwise when the weights exceed this share of the device
    device_memory_fraction: float = knob(0.9, lambda v: 0 < v <= 1, "a share of the device memory in (0, 1]")
    hidden_ram_bytes: int = 8 << 30  # layerwise: a layer's input + output hidden states beyond this go to disk
    work_dir: Optional[str] = None  # layerwise: per-layer checkpoints for resume (default: under paths.cache_dir)


# ---- drop map ----------------------------------------------------------------------------------
@dataclass
class ClassWeightsConfig:
    name: str = MISSING
    weights: Dict[str, float] = field(default_factory=dict)  # class -> weight; unlisted classes get `default`
    default: float = 1.0


@dataclass
class FloorClampConfig:
    """How many experts per layer the floor guarantees. The floor ranking's score is not a knob of
    its own: it is the reference score, at the strategy's alpha, score and outlier knobs under a
    class aggregate, and at their defaults (2.0 * wnorm + count, median outliers) under a pooled
    baseline, which has none (prune/strategies/base.py, Strategy)."""

    name: str = MISSING
    profile: Optional[str] = None  # floor profile artifact dir; null = the run's own profile
    map: Optional[str] = None  # floor map JSON: {"floor_per_layer": {layer: n}} or {layer: n}
    top: Optional[int] = None  # one floor count for every layer (instead of a map)
    band: Optional[List[int]] = None  # [lo, hi]: per-layer floors rescaled into this band
    band_ratio: Optional[List[float]] = None  # [lo, hi] as fractions of the keep count


@dataclass
class KeepConfig:
    experts_per_layer: Optional[int] = None  # exact count kept per layer; overrides drop_fraction
    drop_fraction: float = 0.25
    mode: KeepMode = KeepMode.uniform  # uniform: that count in every layer | budget: that count x layers, spread by score
    min_per_layer: Optional[int] = None  # budget bounds; null = top_k
    max_per_layer: Optional[int] = None  # null = num_experts
    baseline_map: Optional[str] = None  # an earlier drop map: overlap reported; breaks ties under rank_ties=min
    drop_map: Optional[str] = None  # use this map (e.g. from the reference tools) instead of building one


# ---- surgery / quant ---------------------------------------------------------------------------
@dataclass
class PruneConfig:
    shared_ffn_alpha: float = 1.0  # multiply the shared/dense FFN down projection by this
    ablate_shared_ffn: bool = False  # allow shared_ffn_alpha <= 0 (removing or negating it: an ablation)
    max_shard_bytes: int = knob(5_000_000_000, lambda v: v >= 1 << 20, "at least 1 MiB per output shard (1048576)")
    # multi-token-prediction heads (DeepSeek-V3, Qwen3.5/Next), which no profile sees: keep them
    # unpruned (main-model use is unaffected) or drop them whole (the config then counts 0)
    mtp_heads: MtpHeads = MtpHeads.keep


# ---- evaluation --------------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    virtual: bool = False  # score the drop map on the base model (router masking), no prune stage
    validate: bool = False  # only check the bench's scorer: canonical solutions pass, empty answers fail
    resume: bool = True  # keep completions in <cache_dir>/generations.sqlite and reuse them
    # flag a bench loudly when more answers than this are empty
    empty_threshold: float = knob(0.05, lambda v: 0 <= v <= 1, "a share of empty answers between 0 and 1")


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
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    strategy: Any = MISSING  # typed by its preset's schema (beside its class), as are bench, backend, logger
    class_weights: ClassWeightsConfig = MISSING
    floor_clamp: FloorClampConfig = MISSING
    quant_tier: Any = MISSING  # typed by its preset's schema: one per tier kind (quant/)
    bench: Any = MISSING
    backend: Any = MISSING
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    logger: Any = MISSING
    keep: KeepConfig = field(default_factory=KeepConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    stage: str = "all"  # all | profile | dropmap | prune | quant | evaluate
    # What a sweep optimizes: a dotted path into the results ("evaluate.score"), or a list of them
    # for a multi-objective sweep (one per hydra.sweeper.direction). Any: str or list.
    optimized_metric: Any = "evaluate.score"
    extras: Dict[str, Any] = field(default_factory=dict)


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    schema.register()


def typed(node, schema: type):
    """A config node as its schema's dataclass (interpolations resolved): the plain typed value a
    stage hands to domain code. A plain dict is checked against the schema on the way."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def build(node, **runtime):
    """The component a strategy / bench / backend / logger / tier node names by `_target_`, built
    from its schema instance (`cls(cfg=..., **runtime)`: the knobs typed, enums as their Choice),
    with the `runtime` values (a model dir, a DropMap) passed as they are."""
    from hydra.utils import get_class

    cls = get_class(node["_target_"])
    cfg = OmegaConf.to_object(node) if OmegaConf.is_config(node) else dict(node)
    if isinstance(cfg, dict):  # an untyped node: its knobs as keywords, checked against the class's schema
        return cls(**{k: v for k, v in cfg.items() if k != "_target_"}, **runtime)
    return cls(cfg=cfg, **runtime)
