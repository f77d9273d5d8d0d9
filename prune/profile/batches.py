"""What the whole-model and the layer-wise profiling runs share: batching passes by length, right
padding, the non-finite check, and the corpus's token counts and hash."""

from __future__ import annotations

import hashlib
import logging

import torch

from moeprune.errors import MoePruneError
from moeprune.prune.profile.stats import Accumulator, nonfinite_report

log = logging.getLogger("moeprune")


def length_batches(passes: list, batch_size: int, batch_tokens: int) -> list[list]:
    """Passes grouped by tier, sorted longest first, packed into batches of at most `batch_size`
    passes and `batch_tokens` padded tokens (a pass longer than that budget runs alone)."""
    batches = []
    for tier in dict.fromkeys(p.tier for p in passes):
        todo = sorted((p for p in passes if p.tier == tier), key=lambda p: -len(p.ids))
        while todo:
            n = max(1, min(batch_size, batch_tokens // len(todo[0].ids)))
            batches.append(todo[:n])
            todo = todo[n:]
    return batches


def pad_right(batch: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, pass of each flattened token or -1). Right padding keeps every
    token at its own position, so a pass sees exactly what it would see alone (causal attention)."""
    width = max(len(p.ids) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, :len(p.ids)] = torch.tensor(p.ids)
        mask[i, :len(p.ids)] = 1
    counted = mask.bool()
    for i, p in enumerate(batch):  # context-only positions (score_tokens=completion) are not counted
        counted[i, :getattr(p, "start", 0)] = False
    seq = torch.where(counted, torch.arange(len(batch))[:, None], -1).reshape(-1)
    return ids.to(device), mask.to(device), seq.to(device)


def finish(acc: Accumulator, classes: list[str], blocks_layers: list[int], on_nonfinite: str) -> dict:
    """The accumulator's statistics, after the non-finite check the config asks for."""
    stats = acc.stats()
    bad = nonfinite_report(stats, classes, blocks_layers)
    if bad:
        where = "; ".join(f"{c} layer {layer}: {n} tokens" for c, layer, n in bad)
        if on_nonfinite != "skip":
            raise MoePruneError(f"non-finite expert outputs or gates in (class, layer): {where}. Expected finite "
                                "activations (try model.dtype=float32), or profile.on_nonfinite=skip to exclude them")
        log.warning("non-finite expert outputs excluded from the statistics in: %s", where)
    return stats


def corpus_tokens(corpus: dict[str, list]) -> dict[str, int]:
    return {c: sum(len(p.ids) for p in passes) for c, passes in corpus.items()}


def corpus_meta(corpus: dict[str, list]) -> dict:
    h = hashlib.sha256()
    tiers: dict[str, dict[str, int]] = {}
    for c, passes in corpus.items():
        for p in passes:
            h.update(f"{c}|{p.tier}|{p.weight}|{p.start}|{','.join(map(str, p.ids))}\n".encode())
            tiers.setdefault(c, {}).setdefault(p.tier, 0)
            tiers[c][p.tier] += len(p.ids)
    return {"tokens_per_class_tier": tiers, "passes_per_class": {c: len(v) for c, v in corpus.items()},
            "corpus_sha256": h.hexdigest()}
