"""Splitting a thinking model's raw completion into reasoning and answer, by the family's markers."""

from __future__ import annotations


def split_reasoning(raw: str, start: str | None, end: str) -> tuple[str, str]:
    """(reasoning, answer). Text before `end` is reasoning (after `start` when present); with no
    `end`, a completion that opened the reasoning never closed it (all reasoning, empty answer),
    and one that never opened it is all answer."""
    if end in raw:
        head, answer = raw.split(end, 1)
        if start and start in head:
            head = head.split(start, 1)[1]
        return head.strip(), answer.strip()
    if start and start in raw:
        return raw.split(start, 1)[1].strip(), ""
    return "", raw.strip()
