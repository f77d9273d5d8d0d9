"""Choosing the dropped experts of each layer from keep scores: the drop order with its tie-breaks,
the protection set, and the three selections (uniform, budget across layers, group-limited routing).
docs/recipes.md steps 6-9 define them.

Every order here follows a tie rule (`strategy.rank_ties`):
- `stable`, the reference's: a stable sort by score alone, ascending for the drop order and on the
  negated score for every "top-K" (numpy `argsort(-x, kind="stable")`), so among equal scores the
  lower id comes first in both directions: it drops first and it is protected first. The baseline
  map breaks no tie (it is only reported).
- `min`: one order decides everything: ascending score, then (ties) baseline-dropped, then lower
  id; a top-K takes the reverse of that order (among equal scores the higher id wins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeprune.errors import MoePruneError


def drop_order(score: np.ndarray, baseline_dropped: set[int], ties: str = "min") -> np.ndarray:
    """Experts from first-to-drop to last: lowest score first; ties by the rule (module docstring)."""
    if ties == "stable":
        return np.argsort(score, kind="stable")
    ids = np.arange(len(score))
    in_baseline = np.array([0 if e in baseline_dropped else 1 for e in ids])
    return np.lexsort((ids, in_baseline, score))


def keep_order(score: np.ndarray, baseline_dropped: set[int], ties: str = "min") -> np.ndarray:
    """Experts from most to least worth keeping: what a top-K takes its first K from. A stable
    descending sort is not the ascending one reversed: its ties keep the lower id first."""
    if ties == "stable":
        return np.argsort(-score, kind="stable")
    return drop_order(score, baseline_dropped, ties)[::-1]


@dataclass
class Protection:
    experts: set[int]
    by: dict[str, int]  # reason -> how many experts it named (before any trimming)


def protect(l: int, agg, per_class, weights, protect_top: int, class_top: int, floor_scores, floor_n,
            limit: int, base: set[int], ties: str = "min") -> Protection:
    """Layer l's never-dropped set: its top `protect_top` by agg, each weighted class's top
    `class_top`, the top `floor_n` by the floor ranking; at most `limit` of them."""
    top = set(keep_order(agg[l], base, ties)[:protect_top].tolist())
    by_class = set()
    for c in np.nonzero(weights > 0)[0]:
        by_class |= set(keep_order(per_class[c, l], base, ties)[:class_top].tolist())
    by_floor = set()
    if floor_scores is not None:
        by_floor = set(keep_order(floor_scores[l], base, ties)[:floor_n].tolist())
    experts = top | by_class | by_floor
    if len(experts) > limit:  # more protected than kept: the floor ranking (else agg) decides
        rank = floor_scores[l] if floor_scores is not None else agg[l]
        experts = set([e for e in keep_order(rank, base, ties).tolist() if e in experts][:limit])
    return Protection(experts, {"top": len(top), "class_top": len(by_class), "floor": len(by_floor)})


def select_uniform(agg, protections: list[Protection], bases: list[set[int]], keep: int,
                   ties: str = "min") -> list[list[int]]:
    L, E = agg.shape
    drops = []
    for l in range(L):
        candidates = [e for e in drop_order(agg[l], bases[l], ties).tolist() if e not in protections[l].experts]
        drops.append(sorted(candidates[:E - keep]))
    return drops


def select_budget(agg, protections: list[Protection], bases: list[set[int]], keep: int, lo: int,
                  hi: int, ties: str = "min") -> list[list[int]]:
    """Keep keep*L experts in all: each layer's protected and its best `lo`, then the best remaining
    (layer, expert) pairs by agg across layers, at most `hi` per layer (stable ties: lower layer,
    then lower id first)."""
    L, E = agg.shape
    kept = []
    for l in range(L):
        rest = [e for e in keep_order(agg[l], bases[l], ties).tolist() if e not in protections[l].experts]
        kept.append(set(protections[l].experts) | set(rest[:max(lo - len(protections[l].experts), 0)]))
    left = keep * L - sum(map(len, kept))
    if left < 0:
        raise MoePruneError(f"keep.mode=budget: protection and min_per_layer={lo} need {keep * L - left} experts, "
                            f"more than the budget {keep * L}: expected fewer protected experts or a larger budget")
    flat_layer, flat_id = np.divmod(np.arange(L * E), E)
    in_base = np.array([0 if e in bases[l] else 1 for l, e in zip(flat_layer, flat_id)])
    if ties == "stable":
        best_first = np.argsort(-agg.reshape(-1), kind="stable")
    else:
        best_first = np.lexsort((flat_id, flat_layer, in_base, agg.reshape(-1)))[::-1]
    for i in best_first:
        if left == 0:
            break
        l, e = int(flat_layer[i]), int(flat_id[i])
        if e not in kept[l] and len(kept[l]) < hi:
            kept[l].add(e)
            left -= 1
    return [sorted(set(range(E)) - k) for k in kept]


def select_grouped(agg, protections: list[Protection], bases: list[set[int]], n_group: int,
                   shapes: list[tuple[int, int]], ties: str = "min") -> tuple[list[list[int]], dict]:
    """Uniform selection under group-limited routing: every layer keeps `c` experts in each of `g`
    groups of consecutive ids, one (g, c) of the legal `shapes` for all layers (a checkpoint has one
    n_group). Within a group the best c go first, protected before unprotected; a layer keeps the
    groups whose chosen experts hold the most protected and then the most score; the shape with the
    most protected and then the most score over all layers wins. Protected experts that no legal
    shape can keep are dropped and counted."""
    L, E = agg.shape
    size = E // n_group
    best = None
    for g_keep, c in shapes:
        kept, protected_kept, score = [], 0, 0.0
        for l in range(L):
            candidates = []
            for g in range(n_group):
                ids = np.arange(g * size, (g + 1) * size)
                local_base = {e - g * size for e in bases[l] if g * size <= e < (g + 1) * size}
                order = ids[keep_order(agg[l, ids], local_base, ties)].tolist()
                order.sort(key=lambda e: e not in protections[l].experts)  # stable: protected first, then by score
                chosen = order[:c]
                candidates.append((sum(e in protections[l].experts for e in chosen), float(agg[l, chosen].sum()),
                                   -g, chosen))
            layer = sorted(candidates, reverse=True)[:g_keep]
            kept.append(sorted(e for *_, chosen in layer for e in chosen))
            protected_kept += sum(p for p, *_ in layer)
            score += sum(s for _, s, *_ in layer)
        if best is None or (protected_kept, score) > best[:2]:
            best = (protected_kept, score, (g_keep, c), kept)
    protected_kept, _, (g_keep, c), kept = best
    dropped = [sorted(set(range(E)) - set(k)) for k in kept]
    lost = sum(len(p.experts) for p in protections) - protected_kept
    return dropped, {"n_group": n_group, "groups_kept": g_keep, "per_group": c, "legal_shapes": shapes,
                     "protected_dropped": lost}
