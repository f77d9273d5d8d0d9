"""Run a bench through a backend: generate (resumably), score, and write `summary.json` +
`samples.jsonl`; or validate a bench's scorer on its canonical solutions and on empty answers."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.evaluate import stats
from moeprune.evaluate.backends.base import Backend
from moeprune.evaluate.cache import GenerationCache
from moeprune.evaluate.types import Completion

log = logging.getLogger("moeprune")
SAMPLES_FILE, SUMMARY_FILE, VALIDATION_FILE = "samples.jsonl", "summary.json", "validation.json"


def generate_all(bench, backend: Backend, samples, gen: dict, cache: GenerationCache | None,
                 chunk_size: int) -> tuple[list[Completion], int]:
    """Completions for every sample, reusing cached ones; each finished chunk is cached at once."""
    identity = backend.identity()
    keys = [GenerationCache.key(identity, gen, s.prompt) for s in samples]
    done = cache.get_many(keys) if cache else {}
    reused = sum(1 for k in keys if k in done)
    # Length-sorted, so each batch of the hf backend pads little.
    todo = sorted((i for i, k in enumerate(keys) if k not in done), key=lambda i: len(samples[i].prompt))
    if reused:
        log.info("%s: %d/%d completions reused from the generation cache", bench.name, reused, len(samples))
    for start in range(0, len(todo), chunk_size):
        idx = todo[start:start + chunk_size]
        comps = backend.generate([samples[i].prompt for i in idx], gen["max_new_tokens"], chat=gen["chat"],
                                 thinking_budget=gen["thinking_budget"], sampler=gen["sampler"])
        if len(comps) != len(idx):
            raise MoePruneError(f"backend returned {len(comps)} completions for {len(idx)} prompts")
        new = {keys[i]: c for i, c in zip(idx, comps)}
        done.update(new)
        if cache:
            cache.put_many(new)
        log.info("%s: generated %d/%d", bench.name, min(start + chunk_size, len(todo)), len(todo))
    return [done[k] for k in keys], reused


def run_bench(bench, backend: Backend, out_dir: Path, max_new_tokens: int | None = None, cache_path: Path | None = None,
              empty_threshold: float = 0.05, chunk_size: int | None = None) -> dict:
    samples = bench.samples()
    if not samples:
        raise MoePruneError(f"bench {bench.name}: no problems selected (check bench.n, bench.filter, bench.task_ids)")
    gen = {"max_new_tokens": max_new_tokens or bench.max_new_tokens, "chat": bench.chat,
           "thinking_budget": bench.thinking_budget, "sampler": bench.sampler}
    chunk = chunk_size or backend.chunk_size
    cache = GenerationCache(cache_path) if cache_path else None
    try:
        completions, reused = generate_all(bench, backend, samples, gen, cache, chunk)
    finally:
        if cache:
            cache.close()
    verdicts = bench.score_all(samples, [c.text for c in completions])
    rows = [{"id": s.id, "category": s.category, **{k: v for k, v in s.extra.items() if k == "subdomain"},
             "prompt": s.prompt, "reference": s.reference, "completion": c.text, "reasoning": c.reasoning,
             "answer_source": c.answer_source, "extracted": v.extracted, "pass": v.passed, "detail": v.detail,
             "tokens": c.tokens, "finish_reason": c.finish_reason}
            for s, c, v in zip(samples, completions, verdicts)]
    canonical = {s.id: s.extra["canonical"] for s in samples if "canonical" in s.extra}
    identity = backend.identity()
    summary = summarize(bench, rows, gen, identity, canonical, empty_threshold)
    summary["generation_cache"] = {"reused": reused, "generated": len(samples) - reused}
    out_dir = Path(out_dir)
    write_jsonl(out_dir / SAMPLES_FILE, rows)
    artifacts.write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def summarize(bench, rows: list[dict], gen: dict, identity: dict, canonical: dict, empty_threshold: float) -> dict:
    by_cat = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r["pass"])
    per_cat = {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}
    n, passed = len(rows), sum(r["pass"] for r in rows)
    if getattr(bench, "macro_average", False) and len(by_cat) > 1:  # each category weighs the same
        score = sum(per_cat.values()) / len(per_cat)
        stderr = sum(stats.binomial_stderr(per_cat[c], len(v)) ** 2 for c, v in by_cat.items()) ** 0.5 / len(by_cat)
    else:
        score, stderr = passed / n, stats.binomial_stderr(passed / n, n)
    audit = stats.audits(rows, canonical)
    flags = []
    if audit["empty_rate"] > empty_threshold:
        flags.append(f"EMPTY ANSWERS: {audit['empty']}/{n} ({audit['empty_rate']:.1%}) of {bench.name} answers are "
                     f"empty, above the {empty_threshold:.0%} threshold: check the reasoning parser, chat template "
                     f"and token budget before trusting this score")
    if audit["answer_from_reasoning"]:
        flags.append(f"{audit['answer_from_reasoning']}/{n} answers were read from reasoning_content "
                     f"(content was empty): the server's reasoning parser never closed the thinking block")
    for f in flags:
        log.warning("!" * 20 + " %s " + "!" * 20, f)
    return {
        "bench": bench.name, "n": n, "passed": passed, "score": score, "stderr": stderr,
        "per_category": per_cat if any(by_cat) else {},
        "per_category_n": {c: len(v) for c, v in sorted(by_cat.items())} if any(by_cat) else {},
        "others_mean": others_mean(per_cat),
        "empty_rate": audit["empty_rate"],
        "token_stats": stats.token_stats(rows),
        "rumination": stats.rumination(rows, gen["thinking_budget"], gen["max_new_tokens"]),
        "audits": audit, "flags": flags,
        "model": identity, "data_hash": bench.data_hash,
        "settings": {"bench": bench.settings(), "generation": gen},
    }


def others_mean(per_cat: dict[str, float]) -> dict[str, float]:
    """Per category, the unweighted mean of the other categories' scores: what a recipe targeted at
    one class costs the rest (a sweep objective, `evaluate.others_mean.<class>`). Empty with fewer
    than two categories."""
    if len(per_cat) < 2:
        return {}
    return {c: sum(v for o, v in per_cat.items() if o != c) / (len(per_cat) - 1) for c in per_cat}


def validate_bench(bench, out_dir: Path) -> dict:
    """Feed the scorer each problem's canonical solution (must all pass, where the dataset has one)
    and an empty answer (must all fail). Raises with the offending ids when either does not hold."""
    samples = bench.samples()
    canon = [(s, bench.canonical(s)) for s in samples]
    with_canon = [(s, c) for s, c in canon if c is not None]
    canon_verdicts = bench.score_all([s for s, _ in with_canon], [c for _, c in with_canon])
    empty_verdicts = bench.score_all(samples, [""] * len(samples))
    canon_fail = [(s.id, v.detail) for (s, _), v in zip(with_canon, canon_verdicts) if not v.passed]
    empty_pass = [s.id for s, v in zip(samples, empty_verdicts) if v.passed]
    report = {
        "bench": bench.name, "n": len(samples), "data_hash": bench.data_hash,
        "canonical": {"n": len(with_canon), "passed": len(with_canon) - len(canon_fail),
                      "score": (len(with_canon) - len(canon_fail)) / len(with_canon) if with_canon else None,
                      "failures": canon_fail},
        "empty": {"n": len(samples), "passed": len(empty_pass), "score": len(empty_pass) / len(samples),
                  "passing_ids": empty_pass},
    }
    artifacts.write_json(Path(out_dir) / VALIDATION_FILE, report)
    problems = []
    if canon_fail:
        problems.append(f"{len(canon_fail)}/{len(with_canon)} canonical solutions fail, e.g. {canon_fail[:3]}")
    if empty_pass:
        problems.append(f"{len(empty_pass)} empty answers pass, e.g. {empty_pass[:3]}")
    if problems:
        raise MoePruneError(f"bench {bench.name}: scorer validation failed: " + "; ".join(problems))
    return report


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = artifacts.mkstemp(path)
    try:
        with os.fdopen(fd, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
