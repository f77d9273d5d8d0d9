"""ContribDynamic tiers: the tensor-type file follows the rule documented in docs/quantization.md.

The rule is re-stated here in plain loops (not by calling the module's helpers) and compared with
what quant.contrib_dynamic writes, on a hand-made profile with known ranks and on a real profile.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from moeprune.errors import MoePruneError
from moeprune.profile import Profile
from moeprune.presets import quant_tier
from moeprune.quant import contrib_dynamic


def documented_rule(profile, keep, cd) -> dict[int, str]:
    """docs/quantization.md, "ContribDynamic tiers", steps 1-2, literally."""
    contribution = {}
    for li, layer in enumerate(profile.layers):
        kept = keep.get(layer, range(profile.num_experts))
        per_class = []
        for c in range(len(profile.classes)):
            slots = sum(float(profile["count"][c, li, e]) for e in range(profile.num_experts))
            per_class.append(sum(float(profile["contrib_sum"][c, li, e]) for e in kept) / slots)
        contribution[layer] = sum(per_class) / len(per_class)
    ranked = sorted(profile.layers, key=lambda layer: (-contribution[layer], layer))
    n = len(ranked)
    n_high = math.floor(cd.high_fraction * n + 0.5)
    n_low = min(math.floor(cd.low_fraction * n + 0.5), n - n_high)
    return {layer: cd.high_type if r < n_high else cd.low_type if r >= n - n_low else cd.mid_type
            for r, layer in enumerate(ranked)}


def parse_type_file(text: str) -> dict[int, dict[str, str]]:
    """blk\\.<l>\\.ffn_<family>_exps\\.weight=<type> lines -> {layer: {family: type}}."""
    out: dict[int, dict[str, str]] = {}
    for line in text.split():
        pattern, typ = line.split("=")
        assert pattern.startswith("blk\\.") and pattern.endswith("_exps\\.weight"), line
        layer = int(pattern[len("blk\\."):].split("\\.")[0])
        family = pattern.split("\\.ffn_")[1][: -len("_exps\\.weight")]
        out.setdefault(layer, {})[family] = typ
    return out


def make_profile(contrib: list[list[list[float]]], layers: list[int], count: float = 10.0) -> Profile:
    c = torch.tensor(contrib, dtype=torch.float64)
    return Profile([f"c{i}" for i in range(c.shape[0])], layers, c.shape[2],
                   {"contrib_sum": c, "count": torch.full_like(c, count)}, {f"c{i}": 100 for i in range(c.shape[0])})


CD = OmegaConf.create({"high_type": "q8_0", "mid_type": "q6_k", "low_type": "q5_k",
                       "high_fraction": 0.25, "low_fraction": 0.5})


def test_known_ranks_give_known_types():
    # 5 MoE layers (ids 1,3,5,7,9), 2 classes, 3 experts. Layer totals per class (all experts kept):
    # layer 1: 3, layer 3: 9, layer 5: 6, layer 7: 6 (tie with 5: lower layer first), layer 9: 1.
    rows = {1: [1, 1, 1], 3: [3, 3, 3], 5: [2, 2, 2], 7: [1, 1, 4], 9: [0.5, 0.25, 0.25]}
    profile = make_profile([[rows[l] for l in rows]] * 2, list(rows))
    contribution = contrib_dynamic.layer_contribution(profile, {})
    types = contrib_dynamic.assign_types(contribution, CD)
    # n_high = floor(1.25 + .5) = 1, n_low = min(floor(2.5 + .5), 5 - 1) = 3: ranks 3 > 5 = 7 > 1 > 9
    assert types == {3: "q8_0", 5: "q6_k", 7: "q5_k", 1: "q5_k", 9: "q5_k"}
    assert types == documented_rule(profile, {}, CD)
    lines = contrib_dynamic.tensor_type_lines(types)
    parsed = parse_type_file("\n".join(lines))
    assert parsed == {layer: {f: t for f in ("gate_up", "gate", "up", "down")} for layer, t in types.items()}
    assert len(lines) == 4 * 5


def test_only_kept_experts_count():
    # Layer 0 wins on all experts, but its big expert 2 was pruned away: layer 1 ranks first.
    profile = make_profile([[[1, 1, 10], [3, 3, 0]]], [0, 1])
    cd = OmegaConf.merge(CD, {"high_fraction": 0.5, "low_fraction": 0.5})
    assert contrib_dynamic.assign_types(contrib_dynamic.layer_contribution(profile, {}), cd) == {0: "q8_0", 1: "q5_k"}
    keep = {0: [0, 1]}
    assert contrib_dynamic.assign_types(contrib_dynamic.layer_contribution(profile, keep), cd) == {1: "q8_0", 0: "q5_k"}
    assert documented_rule(profile, keep, cd) == {1: "q8_0", 0: "q5_k"}


def test_every_class_weighs_the_same_whatever_its_size():
    # class 0 routed 10x more slots; per-slot contributions: layer 0 = (1, 0.1), layer 1 = (0.5, 0.5).
    c = torch.tensor([[[10.0], [5.0]], [[0.1], [0.5]]], dtype=torch.float64)
    count = torch.tensor([[[10.0], [10.0]], [[1.0], [1.0]]], dtype=torch.float64)
    profile = Profile(["big", "small"], [0, 1], 1, {"contrib_sum": c, "count": count}, {"big": 10, "small": 1})
    got = contrib_dynamic.layer_contribution(profile, {})
    assert got == pytest.approx({0: (1 + 0.1) / 2, 1: 0.5})


@pytest.mark.parametrize("high, low, n, expected", [
    (0.25, 0.5, 4, ["H", "M", "L", "L"]),
    (0.25, 0.5, 30, ["H"] * 8 + ["M"] * 7 + ["L"] * 15),
    (0.0, 0.0, 3, ["M", "M", "M"]),
    (0.5, 0.5, 3, ["H", "H", "L"]),  # n_high = floor(2.0) = 2 leaves one layer for low
    (1.0, 0.0, 2, ["H", "H"]),
])
def test_fraction_rounding(high, low, n, expected):
    profile = make_profile([[[float(n - i)] for i in range(n)]], list(range(n)))
    cd = OmegaConf.create({"high_type": "H", "mid_type": "M", "low_type": "L",
                           "high_fraction": high, "low_fraction": low})
    types = contrib_dynamic.assign_types(contrib_dynamic.layer_contribution(profile, {}), cd)
    assert [types[i] for i in range(n)] == expected


def test_real_profile_of_a_tiny_model_follows_the_rule(tiny_gemma4):
    from moeprune.adapters import adapter_for
    from moeprune.models import load_model, load_tokenizer, read_config
    from moeprune.prune.calibration import build_corpus
    from moeprune.prune.profile import profile_model
    from test_quant_tiers import compose_run

    cfg = compose_run(f"model.path={tiny_gemma4}", "calibration.samples_per_class=4")
    tok = load_tokenizer(tiny_gemma4)
    model = load_model(tiny_gemma4, "float32", "cpu")
    profile = profile_model(model, adapter_for(read_config(tiny_gemma4)), build_corpus(cfg.calibration, tok))
    cd = quant_tier("cd_q4_k_m").cd
    keep = {profile.layers[0]: [0, 2, 3, 5, 6, 7]}
    types = contrib_dynamic.assign_types(contrib_dynamic.layer_contribution(profile, keep), cd)
    assert types == documented_rule(profile, keep, cd)
    lines = contrib_dynamic.tensor_type_lines(types)
    assert {l: fam["down"] for l, fam in parse_type_file("\n".join(lines)).items()} == types


def test_bad_profiles_are_refused():
    profile = make_profile([[[1.0], [1.0]]], [0, 1], count=0.0)
    with pytest.raises(MoePruneError, match="routed no tokens in MoE layer 0"):
        contrib_dynamic.layer_contribution(profile, {})
    with pytest.raises(MoePruneError, match=r"keep lists name layers \[5\]"):
        contrib_dynamic.layer_contribution(make_profile([[[1.0]]], [0]), {5: [0]})
