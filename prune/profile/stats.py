"""The statistics themselves, computed inside the experts' own forward.

The experts modules of transformers 5 dispatch through its ExpertsInterface (`config.
_experts_implementation`). Profiling registers the implementation "moeprune_profile": it runs the
adapter's grouped computation (the one transformers' `grouped_mm` does), reduces each routed
(token, slot)'s output to its norm, scatters the statistics into device accumulators with
`index_add_`, then gates and sums exactly as `grouped_mm` does. So the model's outputs are
bit-identical to `grouped_mm`'s, there is no second pass over the experts, and nothing syncs with
the host inside the forward.

This module imports only torch and transformers: the GPU benchmarks run it on a bare machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from moeprune.errors import MoePruneError

STATS = ("count", "gate_sum", "contrib_sum", "out_norm_sum", "wnorm", "rnorm", "wsum", "hits", "nonfinite")
IMPLEMENTATION = "moeprune_profile"
_TAP = "_moeprune_tap"


class Accumulator:
    """Running sums per (class, MoE layer, expert) on the model's device.

    Each experts forward adds its fp32 terms into float64 totals, so long corpora lose no precision.
    `begin` sets the batch being profiled: its class, tier weight and the pass of each token.
    """

    def __init__(self, num_classes: int, num_layers: int, num_experts: int, device, neuron_dim: int | None = None):
        self.E = num_experts
        self.sums = torch.zeros(num_classes, num_layers, num_experts, len(STATS), dtype=torch.float64, device=device)
        self.energy = None if neuron_dim is None else torch.zeros(
            num_classes, num_layers, num_experts, neuron_dim, dtype=torch.float64, device=device)
        self.cls, self.weight, self.num_seqs = 0, 1.0, 0
        self._seq: dict[torch.device, torch.Tensor] = {}

    def begin(self, cls: int, weight: float, seq_of_token: torch.Tensor, num_seqs: int) -> None:
        """seq_of_token [tokens]: the pass (row) of each flattened token, -1 for padding."""
        self.cls, self.weight, self.num_seqs = cls, weight, num_seqs
        self._seq = {seq_of_token.device: seq_of_token}

    def _seq_on(self, device: torch.device) -> torch.Tensor:
        """The pass ids on a layer's device (layers may sit on several GPUs under device_map)."""
        if device not in self._seq:
            self._seq[device] = next(iter(self._seq.values())).to(device)
        return self._seq[device]

    def collect(self, layer: int, out, act, ids, tok, gate) -> None:
        """out [S, H] un-gated outputs, act [S, I], ids [S] experts, tok [S] tokens, gate [S] weights."""
        E, B = self.E, self.num_seqs
        seq = self._seq_on(out.device)[tok]
        raw = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)
        g = gate.float()
        valid = seq >= 0
        finite = torch.isfinite(raw) & torch.isfinite(g)
        keep = valid & finite
        one = keep.float()
        g, raw = torch.where(keep, g, 0.0), torch.where(keep, raw, 0.0)
        gated = g * raw
        per_expert = torch.zeros(E, 5, device=out.device).index_add_(
            0, ids, torch.stack([one, g, gated, raw, (valid & ~finite).float()], dim=1))
        # per pass: one bucket per (pass, expert), padding into a spare bucket that is dropped
        key = torch.where(valid, seq * E + ids, B * E)
        per_pass = torch.zeros(B * E + 1, 4, device=out.device).index_add_(
            0, key, torch.stack([one, g, gated * gated, raw * raw], dim=1))[:-1].view(B, E, 4)
        n = per_pass[..., 0]
        hit = n > 0
        terms = torch.stack([
            per_expert[:, 0], per_expert[:, 1], per_expert[:, 2], per_expert[:, 3],
            per_pass[..., 2].sqrt().sum(0), per_pass[..., 3].sqrt().sum(0),
            torch.where(hit, per_pass[..., 1] / n.clamp(min=1), 0.0).sum(0), hit.float().sum(0),
            per_expert[:, 4],
        ], dim=1)
        terms = terms.double()
        terms[:, :-1] *= self.weight  # tier weights scale the statistics; `nonfinite` stays a token count
        self.sums[self.cls, layer] += terms.to(self.sums.device, non_blocking=True)
        if self.energy is not None:
            sq = torch.where(keep[:, None], act.float().square(), 0.0)
            energy = torch.zeros(E, sq.shape[1], device=out.device).index_add_(0, ids, sq)
            self.energy[self.cls, layer] += energy.double().to(self.energy.device, non_blocking=True) * self.weight

    def stats(self) -> dict[str, torch.Tensor]:
        s = self.sums.cpu()
        out = {name: s[..., i].contiguous() for i, name in enumerate(STATS)}
        if self.energy is not None:
            out["neuron_energy"] = self.energy.cpu()
        return out


@dataclass
class _Tap:
    acc: Accumulator
    layer: int  # index into the accumulator's layers
    adapter: object


def profiling_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The "moeprune_profile" experts implementation: grouped_mm's computation plus statistics."""
    tap = getattr(self, _TAP, None)
    if tap is None:  # an experts module sharing the config but not under a profiler
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    k = top_k_index.size(-1)
    out, act, ids, perm = tap.adapter.grouped_expert_outputs(self, hidden_states, top_k_index)
    gate = top_k_weights.reshape(-1)[perm]
    tap.acc.collect(tap.layer, out, act, ids, perm // k, gate)
    # from here on exactly grouped_mm's tail: gate, restore the order, sum the k slots in fp32
    weighted = out * gate.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted = weighted[inv]
    return weighted.view(hidden_states.size(0), k, -1).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, profiling_experts_forward)


@contextlib.contextmanager
def profiling(blocks, adapter, acc: Accumulator, positions: list[int] | None = None):
    """Route the given MoE blocks' experts through the profiling implementation while inside;
    block j accumulates into the accumulator's layer `positions[j]` (default j)."""
    configs = {}
    for li, b in zip(positions or range(len(blocks)), blocks):
        if not hasattr(b.experts, "config") or not hasattr(b.experts, "has_gate"):
            raise MoePruneError(f"layer {b.layer}: experts module {type(b.experts).__name__} does not dispatch "
                                "through transformers' ExpertsInterface: expected a transformers 5 MoE class")
        setattr(b.experts, _TAP, _Tap(acc, li, adapter))
        configs[id(b.experts.config)] = b.experts.config
    saved = {k: c._experts_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation_internal = IMPLEMENTATION
        yield
    finally:
        for k, c in configs.items():
            c._experts_implementation_internal = saved[k]
        for b in blocks:
            if hasattr(b.experts, _TAP):
                delattr(b.experts, _TAP)


def expert_weight_norms(experts) -> torch.Tensor:
    """[E]: Frobenius norm of each expert's up (gate_up) matrix plus that of its down matrix."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return sum(torch.linalg.vector_norm(w, dim=(1, 2), dtype=torch.float32) for w in (up, experts.down_proj)).cpu()


def nonfinite_report(stats: dict, classes: list[str], layers: list[int]) -> list[tuple[str, int, int]]:
    """(class, layer, tokens) for every (class, layer) with non-finite expert outputs or gates."""
    per_cell = stats["nonfinite"].sum(-1)
    return [(classes[c], layers[li], int(per_cell[c, li])) for c, li in per_cell.nonzero().tolist()]


def intermediate_dim(experts) -> int:
    """I of `down_proj` ([E, H, I], or [E, I, H] when transposed as in gpt-oss)."""
    return experts.down_proj.shape[1 if experts.is_transposed else 2]
