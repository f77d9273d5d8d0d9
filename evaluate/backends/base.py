"""What every backend is: turns prompts into completions, says what its generations depend on,
and releases what it holds (a loaded model, a server process, an HTTP client)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from moeprune.evaluate.types import Completion


@runtime_checkable
class Backend(Protocol):
    """Built from its schema's knobs (moeprune/components.py) and no other, plus the run values it
    names in `runtime`, which the evaluate stage passes it."""

    # of model_dir, dtype, device (the run's model), drop_map, shared_ffn_alpha (virtual pruning), model
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
