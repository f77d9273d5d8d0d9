"""The fast profiler against an explicit fp64 per-expert loop, on tiny models of every family."""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_moe  # noqa: E402
from tiny_moe import FAMILIES  # noqa: E402

from moeprune.adapters import adapter_for  # noqa: E402
from moeprune.errors import MoePruneError  # noqa: E402
from moeprune.prune.calibration import Pass  # noqa: E402
from moeprune.prune.profile import Profile, profile_model  # noqa: E402
from moeprune.prune.profile.batches import length_batches, pad_right  # noqa: E402
from moeprune.prune.profile.stats import STATS, Accumulator, profiling  # noqa: E402

SIMPLE_FAMILIES = [f for f in FAMILIES if not f.endswith("_multimodal")]


def random_corpus(vocab: int, seed: int = 0) -> dict[str, list[Pass]]:
    """Two classes, two tiers (weights 1 and 3), passes of different lengths so batches are padded."""
    g = torch.Generator().manual_seed(seed)

    def p(n, tier, w):
        return Pass(tuple(torch.randint(3, vocab, (n,), generator=g).tolist()), tier, w)

    return {"a": [p(n, "short", 1.0) for n in (5, 9, 12, 3, 7)] + [p(20, "long", 3.0), p(17, "long", 3.0)],
            "b": [p(n, "short", 1.0) for n in (11, 4, 8)]}


@contextlib.contextmanager
def mla_fixed():
    """tiny_moe's models, except that DeepSeek-V3's attention (MLA, no grouped KV heads) gets as many
    KV heads as heads: with tiny_moe's shared num_key_value_heads=1 it fails on batches > 1."""
    original = tiny_moe._config

    def fixed(name):
        cls, config = original(name)
        if name == "deepseek_v3":
            config.num_key_value_heads = config.num_attention_heads
        return cls, config

    tiny_moe._config = fixed
    try:
        yield
    finally:
        tiny_moe._config = original


def build_family(family: str):
    with mla_fixed():
        return tiny_moe.build_family(family)


def model_for(family: str):
    model = build_family(family)
    model.set_experts_implementation("grouped_mm")
    return model, adapter_for(model.config.to_dict())


@torch.no_grad()
def reference_stats(model, adapter, corpus, batch_size, batch_tokens) -> dict[str, torch.Tensor]:
    """The slow reference: capture each experts module's inputs in a plain forward, then run every
    expert on its tokens one by one through transformers' own eager code, in float64."""
    blocks = adapter.moe_blocks(model)
    E = blocks[0].experts.num_experts
    ref = {k: torch.zeros(len(corpus), len(blocks), E, dtype=torch.float64) for k in STATS}
    ref["neuron_energy"] = None
    eager = []
    for b in blocks:
        ex = copy.deepcopy(b.experts).double()
        ex.config._experts_implementation_internal = "eager"
        eager.append(ex)
    captured = {}
    hooks = [b.experts.register_forward_hook(lambda m, args, out, li=li: captured.__setitem__(li, args))
             for li, b in enumerate(blocks)]
    energy = None
    for ci, passes in enumerate(corpus.values()):
        for batch in length_batches(passes, batch_size, batch_tokens):
            ids, mask, seq = pad_right(batch, 0, "cpu")
            model(input_ids=ids, attention_mask=mask)
            w_tier = batch[0].weight
            for li, ex in enumerate(eager):
                x, idx, w = captured[li]
                for e in range(E):
                    tok, slot = torch.where(idx == e)
                    keep = seq[tok] >= 0
                    tok, slot = tok[keep], slot[keep]
                    if tok.numel() == 0:
                        continue
                    n = tok.numel()
                    out = ex(x[tok].double(), torch.full((n, 1), e), torch.ones(n, 1, dtype=torch.float64))
                    g = w[tok, slot].double()
                    raw = out.norm(dim=-1)
                    r = {k: ref[k][ci, li] for k in STATS}
                    r["count"][e] += w_tier * n
                    r["gate_sum"][e] += w_tier * g.sum()
                    r["contrib_sum"][e] += w_tier * (g * raw).sum()
                    r["out_norm_sum"][e] += w_tier * raw.sum()
                    for s in seq[tok].unique():
                        sel = seq[tok] == s
                        r["wnorm"][e] += w_tier * torch.linalg.matrix_norm(g[sel, None] * out[sel])
                        r["rnorm"][e] += w_tier * torch.linalg.matrix_norm(out[sel])
                        r["wsum"][e] += w_tier * g[sel].mean()
                        r["hits"][e] += w_tier
                    act = eager_activation(ex, x[tok].double(), e)
                    if energy is None:
                        energy = torch.zeros(len(corpus), len(blocks), E, act.shape[-1], dtype=torch.float64)
                    energy[ci, li, e] += w_tier * act.square().sum(0)
    for h in hooks:
        h.remove()
    ref["neuron_energy"] = energy
    return ref


def eager_activation(ex, x, e):
    """Expert e's intermediate activation (the down projection's input), written out in float64."""
    if ex.is_transposed:  # gpt-oss: [E, H, 2I] weights with biases
        return ex._apply_gate(x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e])
    return ex._apply_gate(torch.nn.functional.linear(x, ex.gate_up_proj[e]))


@pytest.mark.parametrize("family", SIMPLE_FAMILIES)
def test_fast_statistics_equal_fp64_per_expert_loop(family):
    model, adapter = model_for(family)
    corpus = random_corpus(model.config.vocab_size)
    fast = profile_model(model, adapter, corpus, batch_size=3, batch_tokens=40, neuron_energy=True)
    ref = reference_stats(model, adapter, corpus, batch_size=3, batch_tokens=40)
    assert fast["count"].sum() > 0 and fast["hits"].max() > 1
    for k in STATS:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-5, atol=1e-9, msg=lambda m, k=k: f"{family} {k}: {m}")
    # one neuron's energy can be tiny next to its neighbours' (fp32 rounding of the activation is
    # relative to the whole row): the absolute floor scales with the tensor's largest value
    energy = ref["neuron_energy"]
    torch.testing.assert_close(fast["neuron_energy"], energy, rtol=1e-5, atol=1e-7 * energy.abs().max().item())
    # every routed (token, slot) of a real token counts once, times its tier's weight
    k = adapter.top_k(model.config.to_dict())
    assert fast.meta["tokens_per_class_tier"]["a"] == {"short": 36, "long": 37}
    assert (fast["count"][0].sum(-1) == (36 + 3 * 37) * k).all() and (fast["count"][1].sum(-1) == 23 * k).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_with_profiling_identical_to_grouped_mm(family):
    model, adapter = model_for(family)
    blocks = adapter.moe_blocks(model)
    ids, mask, seq = pad_right(random_corpus(model.config.get_text_config().vocab_size)["a"][:4], 0, "cpu")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        acc = Accumulator(1, len(blocks), blocks[0].experts.num_experts, "cpu")
        with profiling(blocks, adapter, acc):
            acc.begin(0, 1.0, seq, ids.shape[0])
            profiled = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, profiled) and torch.equal(plain, after)
    k = adapter.top_k(model.config.to_dict())
    assert (acc.sums[0, :, :, 0].sum(-1) == int(mask.sum()) * k).all(), "padding tokens must not count"
    assert model.config.get_text_config()._experts_implementation == "grouped_mm"


def test_right_padding_gives_each_pass_its_own_outputs():
    model, _ = model_for("gemma4")
    corpus = random_corpus(96)["a"][:3]
    ids, mask, _ = pad_right(corpus, 0, "cpu")
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for i, p in enumerate(corpus):
            alone = model(input_ids=torch.tensor([p.ids])).logits[0]
            torch.testing.assert_close(batched[i, :len(p.ids)], alone, rtol=1e-4, atol=1e-5)


def test_length_batches_respect_size_token_budget_and_tiers():
    corpus = random_corpus(96)["a"]
    batches = length_batches(corpus, batch_size=2, batch_tokens=20)
    assert sorted(len(p.ids) for b in batches for p in b) == sorted(len(p.ids) for p in corpus)
    for b in batches:
        assert len({p.tier for p in b}) == 1 and len(b) <= 2
        assert len(b) == 1 or len(b) * max(len(p.ids) for p in b) <= 20


def test_nonfinite_outputs_are_reported_per_class_and_layer_or_excluded():
    model, adapter = model_for("gemma4")
    with torch.no_grad():
        model.model.layers[1].experts.down_proj[3].fill_(float("nan"))
    corpus = random_corpus(96)
    with pytest.raises(MoePruneError, match=r"non-finite.*a layer 1: \d+ tokens.*b layer 1"):
        profile_model(model, adapter, corpus)
    prof = profile_model(model, adapter, corpus, on_nonfinite="skip")
    assert all(torch.isfinite(prof[k]).all() for k in STATS)
    assert prof["nonfinite"][:, 1, 3].min() > 0 and prof["nonfinite"][:, 0].sum() == 0
    assert prof["count"][:, 1, 3].sum() == 0


def test_non_moe_model_is_refused():
    from transformers import Gemma4ForCausalLM

    from conftest import tiny_gemma4_config

    dense = Gemma4ForCausalLM(tiny_gemma4_config()).eval()
    for layer in dense.model.layers:
        del layer.experts
    adapter = adapter_for({"model_type": "gemma4_text"})
    with pytest.raises(MoePruneError, match="no MoE layers"):
        profile_model(dense, adapter, random_corpus(384))


def test_reference_json_round_trip_and_bad_input(tmp_path):
    from moeprune.prune.profile.__main__ import main
    from moeprune.prune.profile.reference_json import export_reference, import_reference

    model, adapter = model_for("mixtral")
    prof = profile_model(model, adapter, random_corpus(96))
    prof.save(tmp_path)
    export_reference(tmp_path, tmp_path / "ref.json")
    data = json.loads((tmp_path / "ref.json").read_text())
    # the reference's own layout: metadata + categories, one row per expert in id order
    assert data["metadata"]["categories"] == ["a", "b"] and data["metadata"]["num_experts"] == prof.num_experts
    assert set(data["categories"]["a"]) == {"0", "1"}
    assert set(data["categories"]["a"]["1"][7]) == {"id", "wnorm", "rnorm", "wsum", "tc", "cc"}
    assert data["categories"]["a"]["1"][7]["id"] == 7 and isinstance(data["categories"]["a"]["1"][7]["tc"], int)
    back = import_reference(tmp_path / "ref.json", tmp_path / "imported", top_k=2)
    for ours in ("wnorm", "rnorm", "wsum", "count", "hits"):
        torch.testing.assert_close(back[ours], prof[ours], rtol=1e-12, atol=0)
    loaded = Profile.load(tmp_path / "imported")
    assert loaded.classes == ["a", "b"] and loaded.meta["top_k"] == 2
    del data["categories"]["a"]["0"][2]["tc"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(MoePruneError, match=r"a/0/2: missing \['tc'\]"):
        import_reference(tmp_path / "bad.json", tmp_path / "x")
    (tmp_path / "notjson.json").write_text("{oops")
    with pytest.raises(MoePruneError, match="not a readable JSON"):
        import_reference(tmp_path / "notjson.json", tmp_path / "y")
    # the same through the command line
    main(["export", str(tmp_path / "imported"), str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["categories"]["a"]["1"][7]["tc"] == data["categories"]["a"]["1"][7]["tc"]
    assert again["metadata"]["top_k"] == 2
    with pytest.raises(SystemExit, match="error: .*not a readable JSON"):
        main(["import", str(tmp_path / "notjson.json"), str(tmp_path / "z")])
    row = {"id": 0, "wnorm": 1.0, "tc": 3}
    for bad, message in (({"a": {"0": [row]}}, "expected {\"metadata\""),
                         ({"categories": {"a": {"layer0": [row]}}}, "layer key 'layer0': expected an integer id"),
                         ({"categories": {"a": {"0": [{**row, "wnorm": None}]}}}, r"a/0/0: wnorm=None: expected a number"),
                         ({"categories": {"a": {"0": [row, {**row}]}}}, r"a/0: expert ids \[0, 0\]...: expected each of 0..1 once"),
                         ({"categories": {"a": {"0": [row]}, "b": {"1": [row]}}}, "class 'b' has layers"),
                         ({"metadata": {"categories": ["a", "c"]}, "categories": {"a": {"0": [row]}}},
                          "metadata.categories")):
        (tmp_path / "b2.json").write_text(json.dumps(bad))
        with pytest.raises(MoePruneError, match=message):
            import_reference(tmp_path / "b2.json", tmp_path / "w")


@pytest.mark.parametrize("meta, tensors, message", [
    ('{"classes": ["a"]}', None, "KeyError"),
    (None, b"\x00" * 4, "SafetensorError"),
])
def test_a_broken_profile_dir_is_named_not_a_traceback(tmp_path, meta, tensors, message):
    model, adapter = model_for("mixtral")
    profile_model(model, adapter, random_corpus(96)).save(tmp_path)
    if meta is not None:
        (tmp_path / "profile.json").write_text(meta)
    if tensors is not None:
        (tmp_path / "profile.safetensors").write_bytes(tensors)
    with pytest.raises(MoePruneError, match=f"not a readable profile \\({message}"):
        Profile.load(tmp_path)


@pytest.mark.parametrize("weight", [0.5, 3.0])
def test_nonfinite_counts_tokens_whatever_the_tier_weight(weight):
    from moeprune.prune.profile.stats import Accumulator

    acc = Accumulator(1, 1, 4, "cpu")
    acc.begin(0, weight, torch.zeros(3, dtype=torch.long), 1)  # three tokens of one pass
    out = torch.ones(3, 8)
    out[1] = float("nan")  # one routed token's output is NaN
    acc.collect(0, out, out[:, :2], torch.tensor([0, 1, 2]), torch.arange(3), torch.full((3,), 0.5))
    stats = acc.stats()
    assert stats["nonfinite"].sum() == 1 and stats["count"][0, 0, 0] == weight
