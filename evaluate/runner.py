"""Run a bench through a backend and write summary.json + samples.jsonl."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from moeprune import artifacts


def run_bench(bench, backend, out_dir: Path, max_new_tokens: int | None = None) -> dict:
    samples = bench.samples()
    completions = backend.generate([s.prompt for s in samples], max_new_tokens or bench.max_new_tokens)
    rows, by_cat = [], defaultdict(list)
    for s, c in zip(samples, completions):
        ok = bool(bench.score(s, c.text))
        by_cat[s.category].append(ok)
        rows.append({"id": s.id, "category": s.category, "prompt": s.prompt, "reference": s.reference,
                     "completion": c.text, "pass": ok, "tokens": c.tokens, "finish_reason": c.finish_reason})
    n = len(rows)
    score = sum(r["pass"] for r in rows) / n if n else 0.0
    summary = {
        "bench": bench.name,
        "n": n,
        "score": score,
        "stderr": math.sqrt(score * (1 - score) / n) if n else 0.0,
        "per_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())},
        "empty_rate": sum(1 for r in rows if not r["completion"].strip()) / n if n else 0.0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    artifacts.write_json(out_dir / "summary.json", summary)
    return summary
