"""What a bench summary reports beside the score: length statistics, rumination, audits.

Rumination follows the reference cards: a completion "reaches the thinking budget" when its
tokens are at least 97.5% of the budget (they counted >= 12k of 12288); the share of those that
still fail is tokens burned without a correct answer. Without a thinking budget, the cap is
max_new_tokens. Audits catch harness failures that look like model failures: empty answers (the
v4/v5 cards' silent-empty pathology), answers read from `reasoning_content`, fenced code, and
replies that contain the canonical solution verbatim (contamination).
"""

from __future__ import annotations

import math
import re

import numpy as np

SATURATION = 0.975


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "max": None, "mean": None}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "max": float(a.max()),
            "mean": float(a.mean())}


def _chars(row: dict) -> int:
    # an answer read from reasoning_content is the reasoning itself: count it once
    if row.get("answer_source") == "reasoning_content":
        return len(row["reasoning"])
    return len(row["reasoning"]) + len(row["completion"])


def token_stats(rows: list[dict]) -> dict:
    tokens = [r["tokens"] for r in rows if r["tokens"] is not None]
    return {"chars": _pcts([_chars(r) for r in rows]),
            "tokens": _pcts(tokens), "tokens_known": len(tokens)}


def rumination(rows: list[dict], thinking_budget: int | None, max_new_tokens: int) -> dict:
    cap = thinking_budget or max_new_tokens
    known = [r for r in rows if r["tokens"] is not None]
    sat = [r for r in known if r["tokens"] >= SATURATION * cap]
    sat_fail = [r for r in sat if not r["pass"]]
    passed = [r["tokens"] for r in known if r["pass"]]
    failed = [r["tokens"] for r in known if not r["pass"]]
    return {
        "cap": cap, "cap_is": "thinking_budget" if thinking_budget else "max_new_tokens",
        "saturated": len(sat), "saturated_share": len(sat) / len(known) if known else None,
        "saturated_failed": len(sat_fail), "saturated_failed_share": len(sat_fail) / len(sat) if sat else None,
        "mean_tokens_pass": float(np.mean(passed)) if passed else None,
        "mean_tokens_fail": float(np.mean(failed)) if failed else None,
        "truncated": sum(1 for r in rows if r["finish_reason"] == "length"),
    }


def _squash(code: str) -> str:
    return re.sub(r"\s+", "", code)


def audits(rows: list[dict], canonical: dict[str, str], min_canonical_chars: int = 40) -> dict:
    n = len(rows) or 1
    empty = sum(1 for r in rows if not r["completion"].strip())
    fenced = sum(1 for r in rows if "```" in r["completion"])
    fallback = sum(1 for r in rows if r["answer_source"] == "reasoning_content")
    verbatim = checked = 0
    for r in rows:
        sol = _squash(canonical.get(r["id"], ""))
        if len(sol) >= min_canonical_chars:  # short solutions are inevitable, not memorized
            checked += 1
            verbatim += sol in _squash(r["completion"])
    return {"empty": empty, "empty_rate": empty / n, "fenced": fenced, "fenced_rate": fenced / n,
            "answer_from_reasoning": fallback, "answer_from_reasoning_rate": fallback / n,
            "verbatim_canonical": verbatim, "verbatim_canonical_checked": checked,
            "verbatim_canonical_rate": verbatim / checked if checked else None}


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of k successes in n trials."""
    if n <= 0:
        raise ValueError(f"wilson: n={n}, expected at least one trial")
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def mcnemar(a: dict[str, bool], b: dict[str, bool]) -> tuple[float, float]:
    """Paired difference a - b in pass rate on a's task ids (b must have them all), and the exact
    McNemar p: the two-sided binomial test at 1/2 on the discordant pairs, 2·P(X <= min) capped at
    1, in exact integers (the same as scipy's binomtest at p=0.5)."""
    ids = sorted(a)
    only_a = sum(a[i] and not b[i] for i in ids)
    only_b = sum(b[i] and not a[i] for i in ids)
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return (only_a - only_b) / len(ids), min(1.0, 2 * tail / 2 ** n) if n else 1.0

