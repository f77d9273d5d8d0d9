"""What every backend is: turns prompts into completions, says what its generations depend on,
and releases what it holds (a loaded model, a server process, an HTTP client)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

from omegaconf import MISSING

from moeprune import schema
from moeprune.evaluate.types import Completion

_NO_LIMIT = "at least 1 token, or null for the bench's own limit"


@dataclass
class BackendConfig:
    """Every backend's knobs."""

    _target_: str = MISSING
    name: str = MISSING
    max_new_tokens: Optional[int] = schema.knob(None, lambda v: v >= 1, _NO_LIMIT)  # None: the bench's own limit
    reasoning_start: Optional[str] = None  # the model family's thinking markers, e.g. <think> / </think>
    reasoning_end: Optional[str] = None
    enable_thinking: bool = False  # chat template kwarg


# Here rather than beside HFBackend: hf.py imports torch, which registering the schemas (every
# command, `--help` included) must not pay for.
@schema.schema("backend", "hf")
@dataclass
class HFBackendConfig(BackendConfig):
    name: str = "hf"
    batch_size: int = schema.knob(128, lambda v: v >= 1, "at least 1 prompt per generate call")  # per generate call


@runtime_checkable
class Backend(Protocol):
    """Built from its schema (`cfg`, a BackendConfig subclass: config.build passes the preset's) or
    Python keywords over the schema's defaults, plus the run values it names in `runtime`, which the
    evaluate stage passes it."""

    # of model_dir, dtype, device (the run's model), virtual (a VirtualPrune: moeprune.dropmap), model
    runtime: tuple[str, ...]
    # prompts worth generating (and caching) together: a batch, or enough to keep the requests busy
    chunk_size: int

    def generate(self, prompts: list[str], max_new_tokens: int, *, chat: bool = False,
                 thinking_budget: int | None = None, sampler: dict | None = None) -> list[Completion]:
        """One completion per prompt, in order. chat: send each prompt as a user turn through the
        chat template; thinking_budget: reasoning tokens allowed; sampler: temperature, top_p, top_k."""

    def identity(self) -> dict:
        """What this backend's generations depend on (model, weights, request knobs): the
        generation cache key."""

    def close(self) -> None:
        """Release the model, server or client; the backend is not used afterwards."""
