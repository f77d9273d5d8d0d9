"""ContribDynamic (CD) tiers: expert tensors of high-contribution layers get more bits.

The rule (docs/quantization.md states it in words; tests/test_quant_cd.py holds this code to it):

1. Layer contribution. For MoE layer l, with the experts the pruned model kept (K_l):
       c_l = mean over calibration classes c of  sum_{e in K_l} contrib_sum[c, l, e] / sum_{all e} count[c, l, e]
   i.e. the gate-weighted expert output norm the kept experts add to the residual stream per routed
   (token, slot) of the profile; every class counts equally whatever its size, and the calibration
   tiers' weights (which scale both sums) cancel.
2. Rank the MoE layers by c_l, highest first (ties: lower layer index first). With L MoE layers,
   the first n_high = floor(high_fraction * L + 0.5) get `high_type`, the last
   n_low = min(floor(low_fraction * L + 0.5), L - n_high) get `low_type`, the rest `mid_type`.
3. Every routed-expert tensor of the layer (llama.cpp names them blk.<l>.ffn_{gate,up,gate_up,down}_exps)
   gets that type through llama-quantize's --tensor-type-file, one `regex=type` line per tensor
   family and layer. Nothing else is listed: attention, the dense/shared FFN, the router, norms and
   embeddings follow the tier's base mix (norms and the router stay F32 in every mix; the "_L"
   options, if set, type the embeddings and output).
llama.cpp still applies its shape fallback afterwards (a K-quant on rows not a multiple of 256 becomes
the 32-block type of similar size); the manifest records every tensor that fell back.
"""

from __future__ import annotations

import math

from moeprune.errors import MoePruneError

EXPERT_FAMILIES = ("gate_up", "gate", "up", "down")  # llama.cpp's ffn_<family>_exps tensors


def layer_contribution(profile, keep: dict[int, list[int]]) -> dict[int, float]:
    """c_l for every MoE layer of the profile (see the module docstring); `keep` maps layer -> kept ids
    (layers absent from `keep` kept every expert)."""
    contrib = profile["contrib_sum"].double()  # [C, L, E]
    slots = profile["count"].double().sum(dim=2)  # [C, L] routed (token, slot)s per class and layer
    if (slots <= 0).any():
        c, li = (slots <= 0).nonzero()[0].tolist()
        raise MoePruneError(f"profile class {profile.classes[c]!r} routed no tokens in MoE layer {profile.layers[li]}: "
                            "expected every class to reach every layer")
    unknown = sorted(set(keep) - set(profile.layers))
    if unknown:
        raise MoePruneError(f"keep lists name layers {unknown} that the profile has no statistics for "
                            f"(profile MoE layers: {profile.layers})")
    out = {}
    for li, layer in enumerate(profile.layers):
        ids = keep.get(layer, list(range(profile.num_experts)))
        per_class = contrib[:, li, ids].sum(dim=1) / slots[:, li]
        out[layer] = float(per_class.mean())
    return out


def assign_types(contribution: dict[int, float], cd) -> dict[int, str]:
    """layer -> ggml type for its expert tensors (rule steps 2-3)."""
    order = sorted(contribution, key=lambda layer: (-contribution[layer], layer))
    n = len(order)
    n_high = math.floor(cd.high_fraction * n + 0.5)
    n_low = min(math.floor(cd.low_fraction * n + 0.5), n - n_high)
    types = {}
    for rank, layer in enumerate(order):
        if rank < n_high:
            types[layer] = cd.high_type
        elif rank >= n - n_low:
            types[layer] = cd.low_type
        else:
            types[layer] = cd.mid_type
    return types


def tensor_type_lines(layer_types: dict[int, str]) -> list[str]:
    """llama-quantize --tensor-type-file lines: a regex searched in each tensor name, then =type."""
    return [f"blk\\.{layer}\\.ffn_{family}_exps\\.weight={layer_types[layer].lower()}"
            for layer in sorted(layer_types) for family in EXPERT_FAMILIES]
