"""The records that pass between benches, backends and the scorer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    reference: str
    category: str = ""  # breakdown key (toy class, GPQA subdomain, ...)
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    finish_reason: str  # stop | length
