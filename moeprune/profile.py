"""The profile as data: per-class, per-layer, per-expert routing statistics, saved as
`profile.safetensors` + `profile.json`. On the ground floor because the recipe engine (prune/), the
GGUF tiers (quant/) and the stages all read one; computing it is moeprune.prune.profile.


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
How they are computed: prune/profile/ (stats.py; layer by layer from the shards: layerwise.py;
the run: run.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.artifacts import mkstemp, write_json
from moeprune.errors import MoePruneError

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
