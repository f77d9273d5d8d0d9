"""What every bench shares: its data source, prompt template, generation settings and sandbox limits.

A bench is built from `conf/bench/<name>.yaml` by `_target_`. Subclasses define `build` (dataset
rows -> samples), `score` (a completion -> Verdict) and, where the dataset has one, `canonical` (a
completion that must pass: what `evaluate.validate=true` feeds the scorer).
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor

from moeprune.errors import MoePruneError
from moeprune.evaluate.sandbox import Limits, isolation_record, require_isolation
from moeprune.evaluate.data import load_rows
from moeprune.evaluate.types import Sample, Verdict

log = logging.getLogger("moeprune")
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
# bench.split on a dataset bench: the whole set (standalone evaluation, comparable with published
# numbers), or one of two halves chosen by a hash of each task's id, so the halves are the same
# whatever the dataset's row order or version (a task keeps its half as long as it keeps its id).
TASK_SPLITS = ("all", "val", "test")
VAL_FRACTION = 0.5


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
    # The knobs beyond every bench's that this bench reads, as its schema lists them (moeprune/components.py):
    # of sandbox, seed, task_ids, languages, classes, n_per_class. Another bench's knob is refused, not ignored.
    reads: tuple[str, ...] = ()
    runs_code = False  # scored in the sandbox, several samples at a time

    def __init__(self, name: str | None = None, data: dict | None = None, split: str | None = None, n: int | None = None,
                 n_per_class: int | None = None, seed: int | None = None, chat: bool = True, prompt: str | None = None,
                 max_new_tokens: int | None = None, thinking_budget: int | None = None,
                 sampler: dict | None = None, sandbox: dict | None = None, filter: dict | None = None,
                 task_ids: list | None = None, languages: list | None = None, classes: list | None = None):
        for knob, value in (("task_ids", task_ids), ("languages", languages), ("classes", classes), ("seed", seed),
                            ("sandbox", sandbox), ("n_per_class", n_per_class)):
            if value is not None and knob not in self.reads:
                raise MoePruneError(f"bench {name}: bench.{knob} is set but this bench has no {knob}; expected null")
        n_per_class, seed = 100 if n_per_class is None else n_per_class, 0 if seed is None else seed
        if n is not None and n <= 0:
            raise MoePruneError(f"bench {name}: bench.n={n}: expected a positive count or null (all)")
        if thinking_budget is not None and thinking_budget <= 0:
            raise MoePruneError(f"bench {name}: bench.thinking_budget={thinking_budget}: expected > 0 or null")
        self.name, self.n, self.n_per_class, self.seed, self.chat = name or self.default_name, n, n_per_class, seed, chat
        self.data = {**self.default_data, **{k: v for k, v in (data or {}).items() if v is not None}}
        self.data_split = self.data.pop("split", None) or self.default_data_split
        self.split = split or self.default_split
        self.check_split()
        self.prompt = prompt or self.default_prompt
        self.max_new_tokens = max_new_tokens or self.default_max_new_tokens
        self.thinking_budget = thinking_budget
        self.sampler = {**GREEDY, **(sampler or {})}
        self.limits = sandbox_limits(sandbox or {})
        if self.runs_code:  # before any generation: refuse early rather than after hours of it
            require_isolation(self.limits.isolation, self.limits.accept_unsafe)
        self.workers = int((sandbox or {}).get("workers") or 2)
        self.task_ids, self.languages, self.classes = task_ids, languages, classes
        self.filter = dict(filter or {})
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
            if knob in self.reads:
                out[knob] = getattr(self, knob)
        return out


def sandbox_limits(cfg: dict) -> Limits:
    known = {k: v for k, v in cfg.items() if k in Limits.__dataclass_fields__ and v is not None}
    return Limits(**known)
