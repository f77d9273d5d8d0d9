"""The records that pass between benches, backends and the scorer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str  # the user turn (chat benches) or the raw prompt text (completion benches)
    reference: str  # the gold answer as text (for the per-sample record; scoring may use `extra`)
    category: str = ""  # breakdown key (toy class, GPQA domain, MATH subject, language, ...)
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # tests, choices, kwargs, ...


@dataclass(frozen=True)
class Completion:
    text: str  # the answer the scorer reads (reasoning removed)
    tokens: int  # generated tokens, reasoning included
    finish_reason: str  # stop | length
    reasoning: str = ""  # the thinking part, when the backend separates it
    answer_source: str = "content"  # content | reasoning_content (the answer was read from the reasoning field)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    extracted: str = ""  # what the scorer compared (the extracted answer or code)
    detail: str = ""  # why it failed (sandbox status, no answer found, ...)
