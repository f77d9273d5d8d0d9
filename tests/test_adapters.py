"""Every adapter, on a tiny random model of its family, in every on-disk layout it meets:
the physically pruned checkpoint loads with from_pretrained and computes the same logits as the
virtually pruned base model; each output tensor is the source's kept slice (renumbered); dropping
nothing reproduces every tensor byte for byte."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from moeprune.adapters import ADAPTERS, adapter_for
from moeprune.models import read_config
from moeprune.prune.surgery import INDEX, prune_checkpoint
from tiny_moe import FAMILIES, build_family, load_family, save_family

# "fused" only where save_pretrained writes one tensor per expert (elsewhere it is the same file)
PER_EXPERT_ON_DISK = {"qwen3_moe", "mixtral", "olmoe", "qwen3_5_moe", "qwen3_5_moe_multimodal", "qwen3_next", "deepseek_v3"}
CASES = [(f, "saved") for f in FAMILIES] + [(f, "fused") for f in FAMILIES if f in PER_EXPERT_ON_DISK] + [("gpt_oss", "mxfp4")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(family, layout):
        if (family, layout) not in made:
            path = tmp_path_factory.mktemp(f"{family}_{layout}") / "src"
            # the saved layout in several shards, so the index path is exercised everywhere
            made[family, layout] = save_family(family, path, layout, max_shard_size="40KB" if layout == "saved" else None)
        return made[family, layout]

    return get


def drop_map_for(family, adapter, config, layers, seed=0):
    rng, e = random.Random(seed), adapter.num_experts(config)
    if family == "deepseek_v3":  # legal: one expert from each of the 4 groups of 4
        return {layer: sorted(4 * g + rng.randrange(4) for g in range(4)) for layer in layers}
    return {layer: sorted(rng.sample(range(e), 3)) for layer in layers}


def tensors(model_dir):
    files = sorted(p for p in model_dir.glob("*.safetensors"))
    out = {}
    for path in files:
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("family,layout", CASES)
def test_physical_prune_equals_virtual_prune(family, layout, checkpoints, tmp_path):
    src = checkpoints(family, layout)
    config = read_config(src)
    adapter = adapter_for(config)
    base = load_family(family, src)
    layers = [b.layer for b in adapter.moe_blocks(base)]
    assert layers, "the adapter found no MoE layers in the loaded model"
    drop = drop_map_for(family, adapter, config, layers)
    out = tmp_path / "pruned"
    info = prune_checkpoint(src, out, drop, max_shard_bytes=60_000)
    assert info["shards"] > 1 and (out / INDEX).is_file()

    pruned = load_family(family, out)
    kept = adapter.num_experts(config) - 3 if family != "deepseek_v3" else 12
    assert adapter.num_experts(read_config(out)) == kept
    assert all(b.experts.num_experts == kept for b in adapter.moe_blocks(pruned))

    ids = torch.randint(12, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        with adapter.virtual_prune(base, drop):
            virtual = base(input_ids=ids).logits
        after = base(input_ids=ids).logits
        physical = pruned(input_ids=ids).logits
    assert torch.isfinite(physical).all()
    torch.testing.assert_close(physical, virtual, rtol=1e-5, atol=1e-5)
    assert (virtual - before).abs().max() > 1e-3, "the drop map must change the logits, or the test proves nothing"
    assert torch.equal(after, before), "virtual_prune must restore the model on exit"

    # per-expert slices, in memory: the pruned model's experts and router rows are the kept ones
    base_blocks, pruned_blocks = adapter.moe_blocks(base), adapter.moe_blocks(pruned)
    for bb, pb in zip(base_blocks, pruned_blocks):
        keep = [e for e in range(adapter.num_experts(config)) if e not in drop[bb.layer]]
        for name, p in pb.experts.named_parameters():
            assert torch.equal(p, dict(bb.experts.named_parameters())[name][keep]), name
        router_weight = pb.router.proj.weight if family.startswith("gemma4") else pb.router.weight
        base_weight = bb.router.proj.weight if family.startswith("gemma4") else bb.router.weight
        assert torch.equal(router_weight, base_weight[keep])


@pytest.mark.parametrize("family,layout", CASES)
def test_output_tensors_are_the_sources_kept_slices(family, layout, checkpoints, tmp_path):
    src = checkpoints(family, layout)
    config = read_config(src)
    adapter = adapter_for(config)
    layers = sorted({adapter.role(n).layer for n in tensors(src) if adapter.role(n).kind in ("expert_axis", "per_expert")})
    drop = drop_map_for(family, adapter, config, layers, seed=3)
    prune_checkpoint(src, tmp_path / "pruned", drop)
    before, after = tensors(src), tensors(tmp_path / "pruned")
    expected = {}
    for name, t in before.items():
        role = adapter.role(name)
        keep = [e for e in range(adapter.num_experts(config)) if e not in drop.get(role.layer, [])]
        if role.kind == "expert_axis":
            expected[name] = t[keep]
        elif role.kind == "per_expert":
            if role.expert in keep:
                expected[role.rename.format(expert=keep.index(role.expert))] = t
        else:
            expected[name] = t
    assert sorted(after) == sorted(expected)
    for name, t in expected.items():
        assert after[name].dtype == t.dtype and raw(after[name]) == raw(t), name
    for aux in ("tokenizer_config.json", "generation_config.json"):  # carried over unchanged
        if (src / aux).is_file():
            assert (tmp_path / "pruned" / aux).read_bytes() == (src / aux).read_bytes()


@pytest.mark.parametrize("family,layout", CASES)
def test_dropping_nothing_reproduces_every_tensor_byte_for_byte(family, layout, checkpoints, tmp_path):
    src = checkpoints(family, layout)
    prune_checkpoint(src, tmp_path / "same", {})
    before, after = tensors(src), tensors(tmp_path / "same")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and raw(before[name]) == raw(after[name]), name
    assert read_config(tmp_path / "same") == read_config(src)


def test_registry_covers_every_family():
    assert set(ADAPTERS.names()) == {"gemma4", "qwen3_moe", "mixtral", "olmoe", "qwen3_5_moe", "deepseek_v3", "gpt_oss"}
    types = {t for _, a in ADAPTERS.items() for t in a.model_types}
    assert {"gemma4", "gemma4_text", "qwen3_moe", "mixtral", "olmoe", "qwen3_5_moe", "qwen3_5_moe_text",
            "qwen3_next", "deepseek_v3", "gpt_oss"} <= types


@pytest.mark.parametrize("family", ["gpt_oss", "olmoe", "gemma4"])
def test_expert_output_matches_the_model_s_own_expert(family):
    """The profiler's per-expert output equals what the experts module computes for one expert."""
    adapter = ADAPTERS.get(family)
    model = build_family(family)
    experts = adapter.moe_blocks(model)[0].experts
    x = torch.randn(5, model.config.hidden_size)
    idx = torch.full((5, 1), 3)
    with torch.no_grad():
        ours = adapter.expert_output(experts, 3, x)
        theirs = experts(x, idx, torch.ones(5, 1))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
