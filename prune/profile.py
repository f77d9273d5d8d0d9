"""Per-class, per-layer, per-expert routing statistics from one forward pass per calibration text.

Statistics (each a float32 tensor [classes, moe layers, experts]):
- count        routed tokens (top-k slots)
- gate_sum     sum of the gate weights the router gave the expert
- contrib_sum  sum over routed tokens of gate * ||expert output||   (the contribution)
- out_norm_sum sum over routed tokens of ||expert output||
- wnorm        per pass: Frobenius norm of the gate-weighted output block, summed over passes
               (the reference tool's `wnorm`; its score is alpha * wnorm + count)
- rnorm        the same for the un-gated output
- hits         passes in which the expert was routed at least once (the reference's `cc`)
plus `weight_norm` [layers, experts]: ||W_gate_up||_F + ||W_down||_F, from the weights alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune import artifacts
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")

PASS_STATS = ("count", "gate_sum", "contrib_sum", "out_norm_sum", "wnorm", "rnorm", "hits")
PROFILE_FILE = "profile.safetensors"
META_FILE = "profile.json"


@dataclass
class Profile:
    classes: list[str]
    layers: list[int]  # decoder layer index of each MoE layer
    num_experts: int
    stats: dict[str, torch.Tensor]  # name -> [C, L, E] (weight_norm: [L, E])
    tokens: dict[str, int]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stats[name]

    def save(self, out_dir: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.stats.items()}, str(Path(out_dir) / PROFILE_FILE))
        artifacts.write_json(Path(out_dir) / META_FILE, {
            "classes": self.classes, "layers": self.layers, "num_experts": self.num_experts,
            "tokens_per_class": self.tokens,
        })

    @classmethod
    def load(cls, out_dir: Path) -> "Profile":
        out_dir = Path(out_dir)
        meta = artifacts.read_json(out_dir / META_FILE)
        stats = load_file(str(out_dir / PROFILE_FILE))
        return cls(meta["classes"], meta["layers"], meta["num_experts"], stats, meta["tokens_per_class"])


class _Collector:
    """Accumulates one class's statistics from a hook on each MoE layer's experts module."""

    def __init__(self, adapter, blocks, num_classes: int, device):
        self.adapter, self.blocks = adapter, blocks
        L, E = len(blocks), blocks[0].experts.num_experts
        self.E = E
        self.acc = {k: torch.zeros(num_classes, L, E, dtype=torch.float64, device=device) for k in PASS_STATS}
        self.cls = 0
        self.seq_of_token: torch.Tensor | None = None  # [T] pass id of each flattened token, -1 = padding
        self.num_seqs = 0

    @contextlib.contextmanager
    def hooks(self):
        handles = [b.experts.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, li: int):
        def hook(experts, args, _out):
            x, idx, w = args[0], args[1], args[2]
            seq = self.seq_of_token
            valid = seq >= 0
            for e in range(self.E):
                tok, slot = torch.where((idx == e) & valid[:, None])
                if tok.numel() == 0:
                    continue
                raw = self.adapter.expert_output(experts, e, x[tok]).double().norm(dim=-1)
                g = w[tok, slot].double()
                gated = g * raw
                a, c = self.acc, self.cls
                a["count"][c, li, e] += tok.numel()
                a["gate_sum"][c, li, e] += g.sum()
                a["contrib_sum"][c, li, e] += gated.sum()
                a["out_norm_sum"][c, li, e] += raw.sum()
                s = seq[tok]
                per_seq_w = torch.zeros(self.num_seqs, dtype=torch.float64, device=x.device).index_add_(0, s, gated**2)
                per_seq_r = torch.zeros(self.num_seqs, dtype=torch.float64, device=x.device).index_add_(0, s, raw**2)
                a["wnorm"][c, li, e] += per_seq_w.sqrt().sum()
                a["rnorm"][c, li, e] += per_seq_r.sqrt().sum()
                a["hits"][c, li, e] += (per_seq_r > 0).sum()

        return hook


def weight_norms(adapter, blocks) -> torch.Tensor:
    rows = []
    for b in blocks:
        ex = b.experts
        rows.append(torch.stack([ex.gate_up_proj[e].float().norm() + ex.down_proj[e].float().norm()
                                 for e in range(ex.num_experts)]))
    return torch.stack(rows).cpu()


@torch.no_grad()
def profile_model(model, tokenizer, adapter, corpus: dict[str, list[str]], max_tokens: int, batch_size: int) -> Profile:
    blocks = adapter.moe_blocks(model)
    if not blocks:
        raise MoePruneError("the model has no MoE layers to profile")
    for name, texts in corpus.items():
        if not texts:
            raise MoePruneError(f"calibration class {name!r} is empty: expected at least one text")
    device = next(model.parameters()).device
    col = _Collector(adapter, blocks, len(corpus), device)
    tokens = {}
    with col.hooks():
        for ci, (name, texts) in enumerate(corpus.items()):
            col.cls = ci
            n_tok = 0
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_tokens).to(device)
                mask = enc["attention_mask"]
                B, S = mask.shape
                seq = torch.arange(B, device=device)[:, None].expand(B, S)
                col.seq_of_token = torch.where(mask.bool(), seq, -1).reshape(-1)
                col.num_seqs = B
                model(**enc)
                n_tok += int(mask.sum())
            tokens[name] = n_tok
    stats = {k: v.float().cpu() for k, v in col.acc.items()}
    for k, v in stats.items():
        bad = ~torch.isfinite(v)
        if bad.any():
            where = sorted({(list(corpus)[c], blocks[l].layer) for c, l, _ in bad.nonzero().tolist()})
            raise MoePruneError(f"non-finite {k} statistics in (class, layer): {where}")
    stats["weight_norm"] = weight_norms(adapter, blocks)
    return Profile(list(corpus), [b.layer for b in blocks], blocks[0].experts.num_experts, stats, tokens)
