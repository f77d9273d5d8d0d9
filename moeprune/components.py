"""Per-component schemas of the built groups: each strategy, bench, backend and logger preset
names its own schema in its `defaults:` list (`- /schema/strategy/pooled@_here_`), so a knob that
belongs to another component fails at compose time, and enum-valued knobs take only their values.

The run schema (moeprune/config.py) leaves these four groups untyped; the preset's schema types
the node. docs/recipes.md, docs/evaluation.md and docs/tracking.md describe every knob.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCHEMA_GROUP = "schema"  # conf path of the schemas: schema/<group>/<name>


class Choice(str, Enum):
    """An enum-valued knob. Hydra refuses any other value at compose time; code compares, prints
    and hashes it as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__


# ---- strategies (prune/strategies) ------------------------------------------------------------
class Normalize(Choice):
    rank = "rank"
    mean = "mean"
    none = "none"


class RankTies(Choice):
    stable = "stable"  # the reference's: equal scores ranked and sorted by expert id
    min = "min"  # equal scores share the lowest rank; the baseline map breaks them


class Score(Choice):
    legacy = "legacy"  # alpha * wnorm + routed count
    mean = "mean"  # alpha * wnorm
    reap = "reap"  # the class's share of REAP's token mean: contrib_c / pooled routed count
    frequency = "frequency"  # routed count
    gate_mass = "gate_mass"  # summed gate weight


class OutlierMode(Choice):
    keep = "keep"
    median = "median"
    drop = "drop"
    zero = "zero"


@dataclass
class StrategyConfig:
    """Every strategy: the pooled single-criterion baselines (frequency, gate_mass, reap) take these.
    A floor under one ranks by the reference score at ClassAggregateConfig's defaults."""

    _target_: str = MISSING
    name: str = MISSING
    normalize: Normalize = Normalize.rank  # per (class, layer) for class aggregates, per layer when pooled
    protect_top: int = 0  # never drop a layer's top-k experts by agg
    protect_class_top: int = 0  # never drop any weighted class's top-k experts of a layer
    rank_ties: RankTies = RankTies.min


@dataclass
class ClassAggregateConfig(StrategyConfig):
    """max, mean, geomean, sum: per-class scores combined over classes."""

    alpha: float = 2.0  # multiplier of the contribution term: score = alpha * wnorm + tc
    score: Score = Score.legacy  # the per-class base statistic; alpha applies to legacy and mean only
    breadth_bonus: float = 0.0  # agg += breadth_bonus * mean over classes of the normalized scores
    outlier_mode: OutlierMode = OutlierMode.median  # what replaces an outlier cell
    outlier_threshold: Optional[float] = None  # |wnorm| above this is an outlier (non-finite always is)


@dataclass
class RandomStrategyConfig(StrategyConfig):
    seed: int = 0  # another seed, another draw


# ---- benches (evaluate/benches) ---------------------------------------------------------------
@dataclass
class BenchDataConfig:  # docs/evaluation.md
    hf_id: Optional[str] = None  # a Hugging Face dataset id, read by `datasets` (its offline cache honoured)
    config: Optional[str] = None  # the dataset's config (subset) name
    revision: Optional[str] = None
    data_files: Optional[List[str]] = None  # files of the dataset repo to read (LiveCodeBench releases)
    path: Optional[str] = None  # a local JSONL / JSON / parquet file in the dataset's own format; wins over hf_id
    split: Optional[str] = None  # the dataset's own split the rows come from; null = the bench's (test, or train)


@dataclass
class SamplerConfig:
    temperature: float = 0.0  # greedy; the hf backend supports nothing else
    top_p: float = 1.0
    top_k: int = 0


class Isolation(Choice):
    bwrap = "bwrap"
    none = "none"


@dataclass
class SandboxConfig:
    wall_s: float = 10.0  # per program run (per test for LiveCodeBench)
    memory_mb: int = 1024
    output_bytes: int = 1048576
    compile_wall_s: float = 60.0
    open_files: int = 256
    processes: int = 4096  # RLIMIT_NPROC: per host user, not enforced for root; the pid namespace is the real cap
    isolation: Isolation = Isolation.bwrap  # none: no isolation, an explicit opt-out (docs/evaluation.md)
    accept_unsafe: bool = False  # isolation=none refuses to score without it: a program can forge its pass there
    workers: int = 2  # programs run at once


@dataclass
class BenchConfig:
    """Every bench: the answer-scored ones (gsm8k, math500, aime, arc, ifeval) take these."""

    _target_: str = MISSING
    name: str = MISSING
    data: BenchDataConfig = field(default_factory=BenchDataConfig)  # unset fields: the bench's own source
    split: Optional[str] = None  # all | val | test (halves by task-id hash); null = all (toy_suite: its own splits)
    n: Optional[int] = None  # the first n problems (per language for multipl_e); null = all
    chat: bool = True  # send the prompt as a user turn through the chat template
    prompt: Optional[str] = None  # a str.format template over the problem's fields; null = the bench's own
    max_new_tokens: Optional[int] = None  # null: the bench's own limit (reasoning included)
    thinking_budget: Optional[int] = None  # reasoning tokens allowed (servers enforce it); null = no budget
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    filter: Dict[str, Any] = field(default_factory=dict)  # keep rows whose fields equal these values


@dataclass
class ShuffledBenchConfig(BenchConfig):
    """gpqa_diamond: answer options shuffled per question."""

    seed: int = 0


@dataclass
class CodeBenchConfig(BenchConfig):
    """humaneval, humanevalplus, mbpp: programs scored in the sandbox."""

    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class LcbBenchConfig(CodeBenchConfig):
    task_ids: Optional[List[str]] = None  # these problems, in this order


@dataclass
class MultiplEBenchConfig(CodeBenchConfig):
    languages: Optional[List[str]] = None  # rust, java, js (null: all three)


@dataclass
class ToySuiteBenchConfig(BenchConfig):
    n_per_class: int = 100
    seed: int = 0
    classes: Optional[List[str]] = None  # null = every class


class DivergenceMetric(Choice):
    kl = "kl"  # mean KL(base || pruned) over the continuation tokens (lower is better)
    nll = "nll"  # mean negative log-likelihood of the base's tokens (lower is better)
    agreement = "agreement"  # share of positions whose argmax is the base's token (higher is better)


@dataclass
class DivergenceBenchConfig(BenchConfig):
    """divergence: the teacher-forced objective (evaluate/benches/divergence.py)."""

    texts: str = "toy"  # toy (the toy world's tasks) or a dir of held-out <class>.jsonl prompts
    metric: DivergenceMetric = DivergenceMetric.kl  # what score and per_category hold
    top_logprobs: int = 256  # base distribution entries kept per position (the KL is exact when >= vocab)
    n_per_class: int = 100
    classes: Optional[List[str]] = None  # null = every class (toy) / every file in texts


# ---- backends (evaluate/backends) -------------------------------------------------------------
@dataclass
class BackendConfig:
    _target_: str = MISSING
    name: str = MISSING
    max_new_tokens: Optional[int] = None  # None: the bench's own limit
    reasoning_start: Optional[str] = None  # the model family's thinking markers, e.g. <think> / </think>
    reasoning_end: Optional[str] = None
    enable_thinking: bool = False  # chat template kwarg


@dataclass
class HFBackendConfig(BackendConfig):
    batch_size: int = 128  # prompts per generate call


@dataclass
class ServedBackendConfig(BackendConfig):
    """What shapes requests to an OpenAI-compatible server (llama_cpp starts its own)."""

    concurrency: int = 8  # requests in flight
    max_retries: int = 5  # per request, on 5xx / 429 / timeouts, with backoff
    timeout_s: float = 1800.0
    thinking_budget_field: Optional[str] = None  # request field for the budget (vLLM: thinking_token_budget)
    extra_body: Dict[str, Any] = field(default_factory=dict)  # more request fields


@dataclass
class OpenAIBackendConfig(ServedBackendConfig):
    base_url: Optional[str] = None  # the server's API root, e.g. http://127.0.0.1:8000/v1
    model: Optional[str] = None  # the served model name; null = the server's only model
    api_key_env: str = "OPENAI_API_KEY"


@dataclass
class LlamaCppBackendConfig(ServedBackendConfig):
    gguf: Optional[str] = None  # the GGUF file; null = the single *.gguf in the model dir
    server_args: List[str] = field(default_factory=list)  # more llama-server flags


# ---- loggers (moeprune/tracking.py) -----------------------------------------------------------
class WandbMode(Choice):
    offline = "offline"  # no network; `wandb sync` later
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    _target_: str = "moeprune.tracking.NullTracker"
    name: str = "none"


@dataclass
class WandbLoggerConfig(LoggerConfig):
    project: str = "moeprune"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.offline
    group: Optional[str] = None  # null: the Optuna study name in a sweep
    dir: Optional[str] = None  # where wandb/ goes; null: the run's output dir
    tags: List[str] = field(default_factory=list)


SCHEMAS = {
    "strategy": {"pooled": StrategyConfig, "class_aggregate": ClassAggregateConfig, "random": RandomStrategyConfig},
    "bench": {"answer": BenchConfig, "shuffled": ShuffledBenchConfig, "code": CodeBenchConfig,
              "lcb": LcbBenchConfig, "multipl_e": MultiplEBenchConfig, "toy_suite": ToySuiteBenchConfig,
              "divergence": DivergenceBenchConfig},
    "backend": {"hf": HFBackendConfig, "openai": OpenAIBackendConfig, "llama_cpp": LlamaCppBackendConfig},
    "logger": {"none": LoggerConfig, "wandb": WandbLoggerConfig},
}


def register() -> None:
    cs = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"{SCHEMA_GROUP}/{group}", name=name, node=node)
