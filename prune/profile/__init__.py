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


@dataclass
class Profile:
    classes: list[str]
    layers: list[int]  # decoder layer index of each MoE layer
    num_experts: int
    stats: dict[str, torch.Tensor]  # name -> [C, L, E] (weight_norm [L, E], neuron_energy [C, L, E, I])
    tokens: dict[str, int]  # profiled tokens per class
    meta: dict = field(default_factory=dict)  # tokens per tier, passes, corpus/model hashes, mode
    source: Path | None = None  # the artifact dir it was loaded from (named when it is unusable)
    given_by: str | None = None  # the knob a user named it with (their input, not a cache artifact)

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
    def load(cls, out_dir: Path, given_by: str | None = None) -> "Profile":
        from safetensors import SafetensorError

        out_dir = Path(out_dir)
        try:
            meta = json.loads((out_dir / META_FILE).read_text())
            stats = load_file(str(out_dir / PROFILE_FILE))
            core = {k: meta.pop(k) for k in ("classes", "layers", "num_experts", "tokens_per_class")}
        except (OSError, ValueError, SafetensorError, KeyError, TypeError, AttributeError) as e:
            raise MoePruneError(f"{out_dir}: not a readable profile ({type(e).__name__}: {e}); "
                                f"expected {META_FILE} + {PROFILE_FILE} as the profile stage writes them; "
                                f"{rebuild_hint(out_dir, given_by)}") from None
        return cls(core["classes"], core["layers"], core["num_experts"], stats, core["tokens_per_class"], meta,
                   source=out_dir, given_by=given_by)


def rebuild_hint(out_dir: Path | None, given_by: str | None = None) -> str:
    """How to get rid of a broken profile: a plain re-run would be handed the same cached artifact.
    A profile the user named (`given_by`, e.g. floor_clamp.profile) is their input, manifest or not:
    neither deleting it nor cache.refresh (which rebuilds cache entries only) is the advice."""
    if given_by is not None:
        return f"expected an intact profile dir there: point {given_by} at one (moeprune never rebuilds or deletes it)"
    if out_dir is None or not (Path(out_dir) / "manifest.json").is_file():  # not a cached artifact
        return "re-run the profile"
    return (f"this cached profile is broken: rebuild it by deleting {out_dir}, or run with cache.refresh=true "
            "(which rebuilds every stage)")


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
    """python -m moeprune.prune.profile export PROFILE_DIR OUT.json | import [--top-k K] IN.json PROFILE_DIR"""
    import argparse

    from moeprune.prune.reference_json import export_reference, import_reference

    ap = argparse.ArgumentParser(prog="python -m moeprune.prune.profile",
                                 description="convert between moeprune profiles and the reference tool's JSON "
                                             "(expert_neuron_*.json)")
    ap.add_argument("action", choices=("export", "import"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--top-k", type=int, default=None,
                    help="import: the model's routed experts per token, recorded so that `moeprune stage=dropmap "
                         "profile.path=DST` needs no model (the reference JSON does not say it)")
    args = ap.parse_args(argv)
    try:
        if args.action == "export":
            export_reference(args.src, args.dst)
        else:
            import_reference(args.src, args.dst, args.top_k)
    except MoePruneError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
