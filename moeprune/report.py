"""The table a run prints (and logs to W&B): per class, base vs pruned, and the quantized file."""

from __future__ import annotations

from typing import Any


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if n else "-"


def score_columns(results: dict) -> list[tuple[str, dict]]:
    """(header, evaluate result) per evaluated model: base and pruned (empty when not run), then the
    quantized file when it was evaluated, headed by its llama.cpp type (Q4_K_M) or, for a tier with
    none (nvfp4a16), its tier name."""
    cols = [("base", results.get("evaluate_base") or {}), ("pruned", results.get("evaluate") or {})]
    if results.get("evaluate_quant"):
        quant = results.get("quant") or {}
        cols.append((quant.get("type") or quant.get("tier") or "quant", results["evaluate_quant"]))
    return cols


def class_rows(results: dict) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows [class, score per column..., delta] per class of the bench, then ALL; delta
    is the last evaluated column against base."""
    cols = score_columns(results)
    ref = next((r for _, r in reversed(cols) if r), None)
    if ref is None:
        return [], []
    rows = []
    for cls in [*ref.get("per_category", {}), "ALL"]:
        scores = [r.get("score") if cls == "ALL" else r.get("per_category", {}).get(cls) for _, r in cols]
        last = next((s for s in reversed(scores[1:]) if s is not None), None)
        rows.append([cls, *scores, last - scores[0] if last is not None and scores[0] is not None else None])
    return ["class", *(h for h, _ in cols), "delta"], rows


def results_table(results: dict) -> str:
    headers, rows = class_rows(results)
    if not rows:
        return ""
    cols = score_columns(results)
    metric = next((r.get("metric") for _, r in cols if r.get("metric")), None)
    if metric in ("kl", "nll"):  # the divergence objective: nats per token, lower is better
        headers = [f"class ({metric})", *headers[1:]]
        pct = [[r[0], *(f"{s:.4f}" if s is not None else "-" for s in r[1:-1]),
                f"{r[-1]:+.4f}" if r[-1] is not None else "-"] for r in rows]
    else:
        pct = [[r[0], *(f"{s:.1%}" if s is not None else "-" for s in r[1:-1]),
                f"{r[-1] * 100:+.1f}" if r[-1] is not None else "-"] for r in rows]
    lines = [headers, *pct,
             ["experts/layer", *(str(r["num_experts"]) if r.get("num_experts") else "-" for _, r in cols), ""],
             ["size", *(_mb(r.get("size_bytes")) for _, r in cols), ""]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    text.insert(len(text) - 2, "-" * len(text[0]))
    return "\n".join(text)
