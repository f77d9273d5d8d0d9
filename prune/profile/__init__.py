"""Profiling a model: the whole-model run (here), layer by layer from the shards (layerwise.py),
the statistics (stats.py), batching (batches.py), the run's choices (run.py) and the reference
tool's JSON (reference_json.py; `python -m moeprune.prune.profile`). The Profile type they make is
moeprune.profile."""

from __future__ import annotations

import torch

from moeprune.errors import MoePruneError
from moeprune.profile import Profile
from moeprune.prune.profile.batches import corpus_meta, corpus_tokens, finish, length_batches, pad_right
from moeprune.prune.profile.stats import Accumulator, expert_weight_norms, intermediate_dim, profiling


# ---- the whole-model run -----------------------------------------------------------------------
@torch.no_grad()
def profile_model(model, adapter, corpus: dict[str, list], batch_size: int = 64, batch_tokens: int = 65536,
                  pad_id: int = 0, neuron_energy: bool = False, on_nonfinite: str = "error",
                  progress: bool = False) -> Profile:
    """Profile a loaded model over a corpus {class: [Pass]} (moeprune.prune.calibration)."""
    from tqdm.auto import tqdm

    blocks = adapter.moe_blocks(model)
    if not blocks:
        raise MoePruneError(f"the model has no MoE layers to profile: expected a {adapter.name} model with experts")
    for name, passes in corpus.items():
        if not passes:
            raise MoePruneError(f"calibration class {name!r} is empty: expected at least one pass")
    device = next(model.parameters()).device
    experts = blocks[0].experts
    acc = Accumulator(len(corpus), len(blocks), experts.num_experts, device,
                      intermediate_dim(experts) if neuron_energy else None)
    total = sum(len(p.ids) for passes in corpus.values() for p in passes)
    decoder = adapter.text_model(model)  # the decoder stack alone: no LM head, no logits to compute
    with profiling(blocks, adapter, acc), tqdm(total=total, unit="tok", unit_scale=True, disable=not progress,
                                               desc="profile") as bar:
        for ci, passes in enumerate(corpus.values()):
            for batch in length_batches(passes, batch_size, batch_tokens):
                ids, mask, seq = pad_right(batch, pad_id, device)
                acc.begin(ci, batch[0].weight, seq, len(batch))
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                bar.update(sum(len(p.ids) for p in batch))
    layers = [b.layer for b in blocks]
    stats = finish(acc, list(corpus), layers, on_nonfinite)
    stats["weight_norm"] = torch.stack([expert_weight_norms(b.experts) for b in blocks])
    return Profile(list(corpus), layers, experts.num_experts, stats, corpus_tokens(corpus), corpus_meta(corpus))
