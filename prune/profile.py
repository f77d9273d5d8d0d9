"""Profiles: per-class, per-layer, per-expert routing statistics, and the profiling run.

Statistics (float64 tensors [classes, moe layers, experts]; each pass's terms times its tier weight):
- count        routed (token, slot)s                                     (the reference's `tc`)
- gate_sum     sum of the gate weights the router gave the expert
- contrib_sum  sum over routed tokens of gate * ||expert output||        (the contribution)
- out_norm_sum sum over routed tokens of ||expert output||
- wnorm        per pass: Frobenius norm of the gate-weighted output block (tokens x hidden),
               summed over passes                                        (the reference's `wnorm`)
- rnorm        the same for the un-gated output                          (`rnorm`)
- wsum         per pass: mean gate weight over the expert's tokens, summed over passes (`wsum`)
- hits         passes that routed at least one token to the expert       (`cc`)
- nonfinite    routed tokens whose output or gate was NaN/Inf (excluded from every sum above)
plus `weight_norm` [layers, experts] (||W_up||_F + ||W_down||_F, from the weights alone) and, with
`profile.neuron_energy`, `neuron_energy` [classes, layers, experts, intermediate]: the sum of squared
intermediate activations per neuron. A pass is one calibration sequence (prompt [+ continuation]).
How they are computed: prune/profile_stats.py. Layer by layer from the shards: prune/profile_layerwise.py.
The profile stage (corpus, mode, save): prune/profile_run.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError
from moeprune.prune.profile_batches import corpus_meta, corpus_tokens, finish, length_batches, pad_right
from moeprune.prune.profile_stats import Accumulator, expert_weight_norms, intermediate_dim, profiling

PROFILE_FILE = "profile.safetensors"
META_FILE = "profile.json"
# the reference tool's JSON names -> ours
REFERENCE_NAMES = {"wnorm": "wnorm", "rnorm": "rnorm", "wsum": "wsum", "tc": "count", "cc": "hits"}


@dataclass
class Profile:
    classes: list[str]
    layers: list[int]  # decoder layer index of each MoE layer
    num_experts: int
    stats: dict[str, torch.Tensor]  # name -> [C, L, E] (weight_norm [L, E], neuron_energy [C, L, E, I])
    tokens: dict[str, int]  # profiled tokens per class
    meta: dict = field(default_factory=dict)  # tokens per tier, passes, corpus/model hashes, mode

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stats[name]

    def save(self, out_dir: Path) -> None:
        from moeprune.artifacts import mkstemp, write_json

        out_dir = Path(out_dir)
        fd, tmp = mkstemp(out_dir / PROFILE_FILE)
        os.close(fd)
        save_file({k: v.contiguous() for k, v in self.stats.items()}, tmp)
        os.replace(tmp, out_dir / PROFILE_FILE)
        write_json(out_dir / META_FILE, {"classes": self.classes, "layers": self.layers,
                                         "num_experts": self.num_experts, "tokens_per_class": self.tokens,
                                         **self.meta})

    @classmethod
    def load(cls, out_dir: Path) -> "Profile":
        from safetensors import SafetensorError

        out_dir = Path(out_dir)
        try:
            meta = json.loads((out_dir / META_FILE).read_text())
            stats = load_file(str(out_dir / PROFILE_FILE))
            core = {k: meta.pop(k) for k in ("classes", "layers", "num_experts", "tokens_per_class")}
        except (OSError, ValueError, SafetensorError, KeyError, TypeError, AttributeError) as e:
            raise MoePruneError(f"{out_dir}: not a readable profile ({type(e).__name__}: {e}); "
                                f"expected {META_FILE} + {PROFILE_FILE} as the profile stage writes them") from None
        return cls(core["classes"], core["layers"], core["num_experts"], stats, core["tokens_per_class"], meta)

    # ---- the reference tool's JSON ------------------------------------------------------------
    def to_reference(self) -> dict:
        """{class: {layer: {expert: {wnorm, rnorm, wsum, tc, cc}}}}, keys as strings (docs/profiling.md)."""
        def cell(ci, li, e):
            return {ref: float(self.stats[ours][ci, li, e]) for ref, ours in REFERENCE_NAMES.items()}

        return {c: {str(layer): {str(e): cell(ci, li, e) for e in range(self.num_experts)}
                    for li, layer in enumerate(self.layers)}
                for ci, c in enumerate(self.classes)}

    @classmethod
    def from_reference(cls, data: dict) -> "Profile":
        """A profile from the reference tool's JSON: its five statistics; the others stay absent."""
        if not isinstance(data, dict) or not data:
            raise MoePruneError("reference profile: expected {class: {layer: {expert: {wnorm, rnorm, wsum, tc, cc}}}}")
        classes = list(data)
        layers = sorted({_int(k, f"class {c!r}: layer key") for c in classes for k in _dict(data[c], c)})
        experts = sorted({_int(e, f"class {c!r}: expert key") for c in classes for layer in data[c].values()
                          for e in _dict(layer, c)})
        if experts != list(range(len(experts))):
            raise MoePruneError(f"reference profile: expert ids {experts[:5]}...: expected 0..E-1")
        out = {ours: torch.zeros(len(classes), len(layers), len(experts), dtype=torch.float64)
               for ours in REFERENCE_NAMES.values()}
        for ci, c in enumerate(classes):
            for layer, row in data[c].items():
                li = layers.index(int(layer))
                for e, cell in row.items():
                    missing = set(REFERENCE_NAMES) - set(cell) if isinstance(cell, dict) else set(REFERENCE_NAMES)
                    if missing:
                        raise MoePruneError(f"reference profile {c}/{layer}/{e}: missing {sorted(missing)}")
                    for ref, ours in REFERENCE_NAMES.items():
                        value = cell[ref]
                        if isinstance(value, bool) or not isinstance(value, (int, float)):
                            raise MoePruneError(f"reference profile {c}/{layer}/{e}: {ref}={value!r}: expected a number")
                        out[ours][ci, li, int(e)] = float(value)
        # the reference JSON does not record tokens (count sums top_k slots per token)
        return cls(classes, layers, len(experts), out, {c: 0 for c in classes}, {"source": "reference-json"})


def _int(key, what: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise MoePruneError(f"reference profile {what} {key!r}: expected an integer id") from None


def _dict(x, where: str) -> dict:
    if not isinstance(x, dict):
        raise MoePruneError(f"reference profile class {where!r}: expected an object keyed by layer / expert id")
    return x




def export_reference(profile_dir: Path, json_path: Path) -> None:
    from moeprune.artifacts import write_json

    write_json(Path(json_path), Profile.load(profile_dir).to_reference())


def import_reference(json_path: Path, profile_dir: Path) -> Profile:
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as e:
        raise MoePruneError(f"{json_path}: not a readable JSON file ({e})") from None
    profile = Profile.from_reference(data)
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    profile.save(profile_dir)
    return profile


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


def main(argv: list[str] | None = None) -> None:
    """python -m moeprune.prune.profile export PROFILE_DIR OUT.json | import IN.json PROFILE_DIR"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m moeprune.prune.profile",
                                 description="convert between moeprune profiles and the reference tool's JSON")
    ap.add_argument("action", choices=("export", "import"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    try:
        export_reference(args.src, args.dst) if args.action == "export" else import_reference(args.src, args.dst)
    except MoePruneError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
