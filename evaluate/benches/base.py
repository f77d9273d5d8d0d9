"""What every bench shares: its data source, prompt template, generation settings and sandbox limits.

A bench is built from `conf/bench/<name>.yaml` by `_target_`. Subclasses define `build` (dataset
rows -> samples), `score` (a completion -> Verdict) and, where the dataset has one, `canonical` (a
completion that must pass: what `evaluate.validate=true` feeds the scorer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from moeprune import schema
from moeprune.errors import MoePruneError
from moeprune.evaluate.sandbox import Limits, isolation_record
from moeprune.evaluate.sandbox_isolation import ISOLATIONS, require_isolation
from moeprune.evaluate.data import load_rows
from moeprune.evaluate.types import Sample, Verdict

log = logging.getLogger("moeprune")
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
# bench.split on a dataset bench: the whole set (standalone evaluation, comparable with published
# numbers), or one of two halves chosen by a hash of each task's id, so the halves are the same
# whatever the dataset's row order or version (a task keeps its half as long as it keeps its id).
TASK_SPLITS = ("all", "val", "test")
VAL_FRACTION = 0.5


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


@schema.schema("bench", "answer")
@dataclass
class BenchConfig:
    """Every bench: the answer-scored ones (gsm8k, math500, aime, arc, ifeval) take these."""

    _target_: str = MISSING
    name: str = MISSING
    data: BenchDataConfig = field(default_factory=BenchDataConfig)  # unset fields: the bench's own source
    split: Optional[str] = None  # all | val | test (halves by task-id hash); null = all (toy_suite: its own splits)
    n: Optional[int] = schema.knob(None, lambda v: v >= 1, "at least 1 problem, or null for all")  # the first n
    chat: bool = True  # send the prompt as a user turn through the chat template
    prompt: Optional[str] = None  # a str.format template over the problem's fields; null = the bench's own
    # null: the bench's own limit (reasoning included)
    max_new_tokens: Optional[int] = schema.knob(None, lambda v: v >= 1,
                                                "at least 1 token, or null for the bench's own limit")
    # reasoning tokens allowed (servers enforce it); null = no budget
    thinking_budget: Optional[int] = schema.knob(None, lambda v: v >= 1, "> 0 or null")
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    filter: Dict[str, Any] = field(default_factory=dict)  # keep rows whose fields equal these values


# isolation=none: no isolation, an explicit opt-out (docs/evaluation.md); the sandbox's own choices
Isolation = schema.Choice("Isolation", [(v, v) for v in ISOLATIONS])


@dataclass
class SandboxConfig:
    """A code bench's sandbox limits; the defaults are the sandbox's own (evaluate/sandbox.py, Limits)."""

    wall_s: float = schema.knob(Limits.wall_s, lambda v: v > 0, "seconds > 0")  # per program run (per test for LCB)
    memory_mb: int = schema.knob(Limits.memory_mb, lambda v: v >= 1, "at least 1 MB")
    output_bytes: int = schema.knob(Limits.output_bytes, lambda v: v >= 1, "at least 1 byte")
    compile_wall_s: float = schema.knob(Limits.compile_wall_s, lambda v: v > 0, "seconds > 0")
    open_files: int = schema.knob(Limits.open_files, lambda v: v >= 1, "at least 1 file")
    # RLIMIT_NPROC: per host user, not enforced for root; the pid namespace caps
    processes: int = schema.knob(Limits.processes, lambda v: v >= 1, "at least 1 process")
    isolation: Isolation = Isolation(Limits.isolation)
    accept_unsafe: bool = Limits.accept_unsafe  # isolation=none refuses to score without it: a program can forge its pass
    workers: int = schema.knob(2, lambda v: v >= 1, "at least 1 program at once")


# Here rather than in humaneval.py: humaneval, humanevalplus, mbpp, lcb and multipl_e all take it,
# and the base class runs the sandbox (`runs_code`).
@schema.schema("bench", "code")
@dataclass
class CodeBenchConfig(BenchConfig):
    """humaneval, humanevalplus, mbpp: programs scored in the sandbox."""

    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


def task_split(task_id: str) -> str:
    """`val` or `test`: the half a task id hashes into."""
    h = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big")
    return "val" if h < VAL_FRACTION * 2**64 else "test"


def fence(code: str, language: str = "python") -> str:
    return f"```{language}\n{code.rstrip()}\n```"


class Bench:
    default_name = ""  # the preset name a bench built without config gets
    default_data: dict = {}
    default_split = "all"  # the task split (TASK_SPLITS); toy_suite has the toy world's splits instead
    default_data_split = "test"  # the dataset's own split the rows are read from (bench.data.split)
    default_max_new_tokens = 2048
    default_prompt = "{prompt}"
    Schema: type[BenchConfig] = BenchConfig  # its knobs; another bench's knob is refused when the config composes
    runs_code = False  # scored in the sandbox, several samples at a time

    def __init__(self, cfg: BenchConfig | None = None, **knobs):
        self.cfg = cfg = schema.make(self.Schema, cfg, knobs, "bench")
        name = None if cfg.name == MISSING else cfg.name
        self.name, self.n, self.chat = name or self.default_name, cfg.n, cfg.chat
        # the knobs some benches add (toy_suite, divergence, gpqa): settings() records seed for every bench
        self.n_per_class, self.seed = getattr(cfg, "n_per_class", None), getattr(cfg, "seed", 0)
        data = _plain(cfg.data)
        self.data = {**self.default_data, **{k: v for k, v in data.items() if v is not None}}
        self.data_split = self.data.pop("split", None) or self.default_data_split
        self.split = cfg.split or self.default_split
        self.check_split()
        self.prompt = cfg.prompt or self.default_prompt
        self.max_new_tokens = cfg.max_new_tokens or self.default_max_new_tokens
        self.thinking_budget = cfg.thinking_budget
        self.sampler = {**GREEDY, **_plain(cfg.sampler)}
        sandbox = _plain(getattr(cfg, "sandbox", None) or {})
        self.limits = sandbox_limits(sandbox)
        if self.runs_code:  # before any generation: refuse early rather than after hours of it
            require_isolation(self.limits.isolation, self.limits.accept_unsafe)
        self.workers = sandbox.get("workers", SandboxConfig.workers)  # a bench without a sandbox runs no program
        self.filter = dict(cfg.filter or {})
        self.data_hash: str | None = None
        self._samples: list[Sample] | None = None

    # ---- data ---------------------------------------------------------------------------------
    def check_split(self) -> None:
        if self.split not in TASK_SPLITS:
            raise MoePruneError(f"bench {self.name}: bench.split={self.split}: expected one of {TASK_SPLITS} (all: the "
                                f"whole set; val / test: the halves by a hash of each task id); the dataset's own "
                                f"split is bench.data.split (default {self.default_data_split})")

    def rows(self) -> list[dict]:
        rows, self.data_hash = load_rows(self.data, self.data_split, self.name)
        return rows

    def in_split(self, samples: list[Sample]) -> list[Sample]:
        """The samples of bench.split, after bench.n: the halves partition the set a bench reports."""
        if self.split == "all":
            return samples
        return [s for s in samples if task_split(self.split_key(s)) == self.split]

    def split_key(self, sample: Sample) -> str:
        """What a task's half is hashed from: its id, where the dataset gives one that stays put."""
        return sample.id

    def select(self, rows: list[dict]) -> list[dict]:
        """The rows whose fields equal every `bench.filter` value (e.g. difficulty: medium)."""
        for key in self.filter:
            if rows and key not in rows[0]:
                raise MoePruneError(f"bench {self.name}: bench.filter.{key}: the data has no field {key!r}; "
                                    f"expected one of {sorted(rows[0])}")
        return [r for r in rows if all(str(r[k]) == str(v) for k, v in self.filter.items())]

    def build(self, rows: list[dict]) -> list[Sample]:
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        if self._samples is None:
            samples = self.build(self.select(self.rows()))
            if self.n is not None:
                if len(samples) < self.n:
                    raise MoePruneError(f"bench {self.name}: n={self.n} but the data has only {len(samples)} problems")
                samples = samples[: self.n]
            ids = [s.id for s in samples]
            if len(set(ids)) != len(ids):
                raise MoePruneError(f"bench {self.name}: duplicate problem ids in the data")
            self._samples = self.in_split(samples)
        return self._samples

    def render(self, **fields) -> str:
        try:
            return self.prompt.format(**fields)
        except (KeyError, IndexError) as e:
            raise MoePruneError(
                f"bench {self.name}: prompt template uses {e} but a problem offers only {{{', '.join(fields)}}}"
            ) from None
        except ValueError as e:  # a lone brace: str.format syntax
            raise MoePruneError(f"bench {self.name}: prompt template is not a format string ({e}): expected "
                                "fields like {prompt}, with literal braces doubled as {{ and }}") from None

    # ---- scoring ------------------------------------------------------------------------------
    def score(self, sample: Sample, completion: str) -> Verdict:
        raise NotImplementedError

    def score_all(self, samples: list[Sample], completions: list[str]) -> list[Verdict]:
        if not self.runs_code:  # cheap, and math-verify's timeouts need the main thread
            return [self.score(s, c) for s, c in zip(samples, completions)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:  # each score is one subprocess
            return list(pool.map(self._score_or_record, samples, completions))

    def _score_or_record(self, sample: Sample, completion: str) -> Verdict:
        """A scorer failure on one sample (the sandbox could not start, a host error) is that sample's
        fail, logged and recorded; the run goes on. Configuration errors still stop it."""
        try:
            return self.score(sample, completion)
        except MoePruneError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("bench %s: scoring %s failed: %s: %s", self.name, sample.id, type(e).__name__, e)
            return Verdict(False, "", f"scorer error: {type(e).__name__}: {e}")

    def canonical(self, sample: Sample) -> str | None:
        """A completion that must score as passing, or None when the dataset has no reference solution."""
        return None

    def settings(self) -> dict:
        out = {"name": self.name, "class": type(self).__name__, "data": {**self.data, "split": self.data_split},
               "split": self.split,
               "n": self.n, "seed": self.seed, "chat": self.chat, "prompt": self.prompt,
               "max_new_tokens": self.max_new_tokens, "thinking_budget": self.thinking_budget,
               "sampler": self.sampler, "filter": self.filter}
        if self.runs_code:
            out["sandbox"] = {**self.limits.__dict__, **isolation_record(self.limits)}
        for knob in ("task_ids", "languages", "classes"):  # the optional knobs' record
            if hasattr(self.cfg, knob):
                out[knob] = getattr(self, knob)
        return out


def _plain(value) -> dict:
    """A nested knob (a schema instance, or a Python caller's dict) as a dict of plain values."""
    if dataclasses.is_dataclass(value):
        return {k: v.value if isinstance(v, schema.Choice) else v for k, v in dataclasses.asdict(value).items()}
    return dict(value or {})


def sandbox_limits(cfg: dict) -> Limits:
    known = {k: v for k, v in cfg.items() if k in Limits.__dataclass_fields__ and v is not None}
    return Limits(**known)
