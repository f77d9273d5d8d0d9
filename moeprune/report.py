"""The table a run prints: per class, base vs pruned."""

from __future__ import annotations


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if n else "-"


def results_table(results: dict) -> str:
    base, pruned = results.get("evaluate_base"), results.get("evaluate")
    if not base and not pruned:
        return ""
    ref = pruned or base
    cats = list(ref.get("per_category", {}))
    rows = [("class", "base", "pruned", "delta")]
    for c in cats + ["ALL"]:
        b = (base["per_category"].get(c) if c != "ALL" else base["score"]) if base else None
        p = (pruned["per_category"].get(c) if c != "ALL" else pruned["score"]) if pruned else None
        d = f"{(p - b) * 100:+.1f}" if b is not None and p is not None else "-"
        rows.append((c, f"{b:.1%}" if b is not None else "-", f"{p:.1%}" if p is not None else "-", d))
    rows.append(("experts/layer", str(base["num_experts"]) if base else "-", str(pruned["num_experts"]) if pruned else "-", ""))
    rows.append(("size", _mb(base and base["size_bytes"]), _mb(pruned and pruned["size_bytes"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    return "\n".join(lines)
