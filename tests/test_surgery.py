"""Surgery's contract beyond exactness: the shared-FFN upweight, group-limited routing rules, bounded
memory, and bad input that must fail clearly with the source untouched and no output left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat

import pytest
import torch
from safetensors import safe_open

from moeprune import artifacts
from moeprune.adapters import adapter_for
from moeprune.errors import MoePruneError
from moeprune.models import read_config
from moeprune.prune import shards, surgery
from moeprune.prune.surgery import INDEX, METADATA_FILE, SHARED_MARKER, prune_checkpoint
from tiny_moe import build_family, load_family, save_family

DROP2 = {0: [1, 5], 1: [0, 7]}  # two MoE layers of 8 experts (gemma4, mixtral, gpt_oss)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    made = {}

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = save_family(family, tmp_path_factory.mktemp(family) / "src", **kw)
        return made[key]

    return get


def fingerprint(path):
    return artifacts.hash_path(path, full=True)


def copy_of(src, tmp_path):
    dst = tmp_path / "src_copy"
    shutil.copytree(src, dst)
    return dst


def assert_fails_cleanly(src, out, match, **kw):
    before = fingerprint(src)
    with pytest.raises(MoePruneError, match=match):
        prune_checkpoint(src, out, kw.pop("drop_map", DROP2), **kw)
    assert fingerprint(src) == before, "the source must be untouched"
    assert not out.exists(), "no output may be left"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")], "no temp dir may be left"


# ---- shared-FFN upweight ------------------------------------------------------------------------
def test_shared_ffn_upweight_scales_gemma4_dense_down_proj_once(sources, tmp_path):
    src = sources("gemma4")
    out = tmp_path / "up"
    info = prune_checkpoint(src, out, DROP2, shared_ffn_alpha=1.25)
    assert info["shared_ffn_tensors_scaled"] == 2
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["shared_ffn_alpha"] == 1.25 and (out / SHARED_MARKER).read_text().strip() == "1.25"
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        for layer in (0, 1):
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            assert torch.equal(b.get_tensor(name), a.get_tensor(name) * 1.25)
            gate = f"model.layers.{layer}.mlp.gate_proj.weight"
            assert torch.equal(b.get_tensor(gate), a.get_tensor(gate))

    assert_fails_cleanly(out, tmp_path / "twice", "refusing to apply it twice", drop_map={}, shared_ffn_alpha=1.1)
    prune_checkpoint(out, tmp_path / "again", {})  # alpha 1.0 is fine, and the marker travels with it
    assert (tmp_path / "again" / SHARED_MARKER).is_file()
    assert json.loads((tmp_path / "again" / METADATA_FILE).read_text())["previous_prune"]["shared_ffn_alpha"] == 1.25


def test_shared_expert_upweight_on_qwen3_5_moe_equals_scaling_in_memory(sources, tmp_path):
    src = sources("qwen3_5_moe")
    drop = {0: [2, 3], 1: [4, 6]}
    prune_checkpoint(src, tmp_path / "up", drop, shared_ffn_alpha=1.5)
    base, pruned = load_family("qwen3_5_moe", src), load_family("qwen3_5_moe", tmp_path / "up")
    adapter = adapter_for(read_config(src))
    ids = torch.randint(12, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.shared_expert.down_proj.weight.mul_(1.5)
        with adapter.virtual_prune(base, drop):
            expected = base(input_ids=ids).logits
        torch.testing.assert_close(pruned(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_deepseek_upweight_scales_shared_experts_only(sources, tmp_path):
    src = sources("deepseek_v3")
    info = prune_checkpoint(src, tmp_path / "up", {}, shared_ffn_alpha=2.0)
    assert info["shared_ffn_tensors_scaled"] == 2  # the two MoE layers; the dense first layer is not shared FFN


FP8_SHARED = "model.layers.2.mlp.shared_experts.down_proj.weight"


def fp8_source(sources, tmp_path, scale_suffix: str | None):
    """The tiny DeepSeek-V3 with one shared down projection in FP8, as DeepSeek-V3 ships it (block
    scales in `weight_scale_inv`, dequantized W = codes x scale)."""
    from safetensors.torch import load_file, save_file

    src = copy_of(sources("deepseek_v3"), tmp_path)
    state = load_file(src / "model.safetensors")
    state[FP8_SHARED] = state[FP8_SHARED].to(torch.float8_e4m3fn)
    if scale_suffix:
        state[FP8_SHARED + scale_suffix] = torch.tensor([[0.5]])
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("suffix", ["_scale_inv", "_scale"])
def test_fp8_shared_ffn_is_upweighted_through_its_scale(sources, tmp_path, suffix):
    from safetensors.torch import load_file

    src = fp8_source(sources, tmp_path, suffix)
    info = prune_checkpoint(src, tmp_path / "out", {}, shared_ffn_alpha=1.2)
    assert info["shared_ffn_tensors_scaled"] == 2  # layer 1's BF16/F32 weight and layer 2's FP8 scale
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert after[FP8_SHARED].dtype == torch.float8_e4m3fn
    assert torch.equal(after[FP8_SHARED].view(torch.uint8), before[FP8_SHARED].view(torch.uint8))  # codes as they were
    dequant = lambda s: s[FP8_SHARED].float() * s[FP8_SHARED + suffix]  # noqa: E731
    torch.testing.assert_close(dequant(after), 1.2 * dequant(before), rtol=1e-6, atol=0)


def test_upweight_refused_on_an_fp8_shared_ffn_without_its_scale(sources, tmp_path):
    src = fp8_source(sources, tmp_path, None)
    assert_fails_cleanly(src, tmp_path / "out", f"{FP8_SHARED} is stored as F8_E4M3 without a float scale tensor",
                         drop_map={}, shared_ffn_alpha=1.2)


def test_upweight_refused_without_a_shared_ffn(sources, tmp_path):
    assert_fails_cleanly(sources("mixtral"), tmp_path / "out", "has no shared FFN", shared_ffn_alpha=1.2)


# ---- DeepSeek-V3 group-limited routing ----------------------------------------------------------
# 16 experts in n_group=4 groups of 4, topk_group=2, top_k=3; MoE layers 1 and 2
ONE_PER_GROUP = [i for i in range(16) if i % 4 != 3]  # drop 3 of each group of 4
def test_deepseek_whole_group_drop_shrinks_n_group_and_stays_exact(sources, tmp_path):
    src = sources("deepseek_v3")
    drop = {1: [8, 9, 10, 11, 0, 5, 14], 2: [4, 5, 6, 7, 1, 10, 12]}  # one whole group + one per other group
    prune_checkpoint(src, tmp_path / "out", drop)
    config = read_config(tmp_path / "out")
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (9, 3, 2)
    base, pruned = load_family("deepseek_v3", src), load_family("deepseek_v3", tmp_path / "out")
    ids = torch.randint(12, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), adapter_for(config).virtual_prune(base, drop):
        expected = base(input_ids=ids).logits
    torch.testing.assert_close(pruned(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop,match", [
    ({1: [0, 1], 2: [0, 4]}, "same count in every group"),          # group 0 keeps 2, the others 4
    ({1: ONE_PER_GROUP, 2: ONE_PER_GROUP}, "at least 2"),            # each group keeps 1 expert
    ({1: list(range(4, 16)), 2: list(range(4, 16))}, "topk_group"),  # one group left < topk_group=2
    ({1: list(range(4)), 2: [0, 4, 8, 12]}, "one n_group"),          # 12 kept: 3 groups of 4 vs 4 of 3
])
def test_deepseek_illegal_prunes_are_refused(sources, tmp_path, drop, match):
    assert_fails_cleanly(sources("deepseek_v3"), tmp_path / "out", match, drop_map=drop)


def test_deepseek_virtual_prune_refuses_illegal_maps_too():
    model = build_family("deepseek_v3")
    adapter = adapter_for(model.config.to_dict())
    with pytest.raises(MoePruneError, match="same count in every group"):
        with adapter.virtual_prune(model, {1: [0, 1]}):
            pass
    adapter.validate_keep(model.config.to_dict(), 12)
    adapter.validate_keep(model.config.to_dict(), 8)  # 2 per group, or 4 groups of ... 2 groups of 4
    with pytest.raises(MoePruneError, match="group-limited"):
        adapter.validate_keep(model.config.to_dict(), 5)


# ---- streaming -----------------------------------------------------------------------------------
def test_surgery_never_loads_a_tensor_without_upweight(sources, tmp_path, monkeypatch):
    """Without α every byte is copied by range: nothing opens a tensor through safetensors."""
    def no_loading(*a, **k):
        raise AssertionError("surgery loaded a tensor into memory")

    monkeypatch.setattr(surgery, "safe_open", no_loading)
    monkeypatch.setattr(shards, "torch", None)
    prune_checkpoint(sources("gemma4"), tmp_path / "out", DROP2)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_copy_falls_back_to_bounded_reads_when_the_kernel_refuses(sources, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    src = sources("mixtral")
    prune_checkpoint(src, tmp_path / "kernel", DROP2)
    refused = []

    def refuse(*a, **k):
        refused.append(a)
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(shards.os, "copy_file_range", refuse)
    monkeypatch.setattr(shards, "_COPY_CHUNK", 1000)  # many bounded reads per tensor
    prune_checkpoint(src, tmp_path / "out", DROP2)
    assert refused, "the kernel copy was tried and refused"
    a, b = load_file(tmp_path / "kernel" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # byte for byte what the kernel copy wrote
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


# ---- bad input ------------------------------------------------------------------------------------
def test_missing_shard(sources, tmp_path):
    src = copy_of(sources("mixtral", max_shard_size="40KB"), tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_fails_cleanly(src, tmp_path / "out", f"missing.*{shard.name}")


def test_index_naming_a_tensor_the_shard_lacks(sources, tmp_path):
    src = copy_of(sources("mixtral", max_shard_size="40KB"), tmp_path)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = next(iter(index["weight_map"].values()))
    (src / INDEX).write_text(json.dumps(index))
    assert_fails_cleanly(src, tmp_path / "out", "experts.9.w1.weight.*no such tensor")


def test_truncated_shard(sources, tmp_path):
    src = copy_of(sources("gemma4"), tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    assert_fails_cleanly(src, tmp_path / "out", "outside the file")


def test_per_expert_checkpoint_missing_an_expert(sources, tmp_path):
    src = copy_of(sources("olmoe"), tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.experts.6.up_proj.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert_fails_cleanly(src, tmp_path / "out", r"experts\.N\.up_proj\.weight for experts \[6\]")


def test_model_without_moe_layers(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tiny_moe import SMALL

    src = tmp_path / "dense"
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                       intermediate_size=48, mlp_only_layers=[0, 1])).save_pretrained(src)
    assert_fails_cleanly(src, tmp_path / "out", "no expert tensors", drop_map={})


def test_unknown_architecture_lists_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_moe import SMALL

    src = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=48)).save_pretrained(src)
    assert_fails_cleanly(src, tmp_path / "out", "model_type='llama'.*deepseek_v3.*gemma4.*gpt_oss.*mixtral.*olmoe.*qwen3_5_moe.*qwen3_moe",
                         drop_map={})


def test_output_dir_equal_to_inside_or_containing_the_source(sources, tmp_path):
    src = copy_of(sources("gemma4"), tmp_path)
    before = fingerprint(src)
    for out, match in ((src, "is the source dir"), (src / "pruned", "inside it"), (tmp_path, "contains the source")):
        with pytest.raises(MoePruneError, match=match):
            prune_checkpoint(src, out, DROP2)
    assert fingerprint(src) == before and not (src / "pruned").exists()


def test_disk_full_during_write(sources, tmp_path, monkeypatch):
    real = shards.copy_range
    calls = {"n": 0}

    def fill_up(src, dst_fd, start, length):
        calls["n"] += 1
        if calls["n"] == 5:  # a few tensors in: some bytes are on disk already
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst_fd, start, length)

    monkeypatch.setattr(shards, "copy_range", fill_up)
    assert_fails_cleanly(sources("gemma4"), tmp_path / "out", "disk full.*untouched")
    assert calls["n"] == 5


def test_not_enough_free_space_is_refused_before_writing(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(surgery.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    assert_fails_cleanly(sources("gemma4"), tmp_path / "out", "GB free")


@pytest.mark.parametrize("drop,match", [
    ({0: [1, 5], 1: [0]}, "different expert counts per layer"),
    ({0: [1, 8], 1: [0, 7]}, r"expert ids \[8\] out of range 0\.\.7"),
    ({0: [1, 1], 1: [0, 7]}, r"duplicate expert ids \[1\]"),
    ({0: list(range(7)), 1: list(range(7))}, "keeps 1 experts, fewer than top_k=2"),
    ({0: [1, 2], 1: [3, 4], 5: [1, 2]}, r"layers \[5\] that have no experts"),
    ({0: [1, 2]}, r"MoE layers \[1\] have no drop map entry"),
])
def test_bad_drop_maps(sources, tmp_path, drop, match):
    assert_fails_cleanly(sources("gpt_oss"), tmp_path / "out", match, drop_map=drop)


def test_dense_layer_in_drop_map_is_refused_by_virtual_prune():
    model = build_family("qwen3_moe")  # layer 1 is dense
    adapter = adapter_for(model.config.to_dict())
    with pytest.raises(MoePruneError, match=r"layers \[1\] that are not MoE layers"):
        with adapter.virtual_prune(model, {0: [1, 2], 1: [1, 2], 2: [1, 2]}):
            pass


def test_existing_output_is_replaced_only_when_complete(sources, tmp_path, monkeypatch):
    src, out = sources("gemma4"), tmp_path / "out"
    prune_checkpoint(src, out, DROP2)
    first = fingerprint(out)
    monkeypatch.setattr(shards, "copy_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(MoePruneError, match="I/O error"):
        prune_checkpoint(src, out, {0: [2, 3], 1: [2, 3]})
    assert fingerprint(out) == first, "a failed run must leave the previous output as it was"


# ---- multi-token-prediction heads -------------------------------------------------------------------
MTP_CASES = [
    ("qwen3_5_moe", "mtp.layers.0.mlp"),   # Qwen3.5/Next: an `mtp.*` module beside the model
    ("deepseek_v3", "model.layers.3.mlp"),  # DeepSeek-V3: one decoder layer past num_hidden_layers
]


def with_mtp_head(sources, tmp_path, family, extra):
    """The family's tiny checkpoint plus an MTP head: its experts, router and a non-expert tensor."""
    from safetensors.torch import load_file, save_file

    src = copy_of(sources(family), tmp_path)
    state = load_file(src / "model.safetensors")
    e = adapter_for(read_config(src)).num_experts(read_config(src))
    mtp = {f"{extra}.experts.{i}.down_proj.weight": torch.randn(32, 16) for i in range(e)}
    mtp[f"{extra}.gate.weight"] = torch.randn(e, 32)
    mtp[extra.rsplit(".", 1)[0] + ".eh_proj.weight"] = torch.randn(32, 64)
    shared = "shared_expert" if family == "qwen3_5_moe" else "shared_experts"
    mtp[f"{extra}.{shared}.down_proj.weight"] = torch.randn(32, 24)
    save_file({**state, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    drop = {layer: [2, 6, 10, 14][:2] if family == "qwen3_5_moe" else [0, 4, 8, 12] for layer in
            ([0, 1] if family == "qwen3_5_moe" else [1, 2])}
    return src, mtp, drop


@pytest.mark.parametrize("family,extra", MTP_CASES)
def test_mtp_head_experts_are_copied_unpruned_and_the_model_still_loads(sources, tmp_path, family, extra, caplog):
    src, mtp, drop = with_mtp_head(sources, tmp_path, family, extra)
    with caplog.at_level("WARNING", logger="moeprune"):
        prune_checkpoint(src, tmp_path / "out", drop)
    assert "copied unpruned" in caplog.text and "prune.mtp_heads=drop" in caplog.text
    experts = sorted(n for n in mtp if ".experts." in n or n.endswith("gate.weight"))
    assert json.loads((tmp_path / "out" / METADATA_FILE).read_text())["unpruned_expert_tensors"] == experts
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        for name, t in mtp.items():
            assert torch.equal(f.get_tensor(name), t)
    load_family(family, tmp_path / "out")


@pytest.mark.parametrize("family,extra", MTP_CASES)
def test_a_kept_mtp_head_is_copied_as_it_is_even_under_a_shared_ffn_upweight(sources, tmp_path, family, extra):
    src, mtp, drop = with_mtp_head(sources, tmp_path, family, extra)
    info = prune_checkpoint(src, tmp_path / "out", drop, shared_ffn_alpha=2.0)
    assert info["shared_ffn_tensors_scaled"] == 2  # the two MoE layers of the model, not the head's
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        for name, t in mtp.items():
            assert torch.equal(f.get_tensor(name), t), name


@pytest.mark.parametrize("family,extra", MTP_CASES)
def test_mtp_heads_drop_leaves_the_whole_head_out_and_zeroes_its_count(sources, tmp_path, family, extra, caplog):
    src, mtp, drop = with_mtp_head(sources, tmp_path, family, extra)
    config = read_config(src)
    key = {"deepseek_v3": "num_nextn_predict_layers", "qwen3_5_moe": "mtp_num_hidden_layers"}[family]
    config[key] = 1  # as the Hub configs say
    (src / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="moeprune"):
        info = prune_checkpoint(src, tmp_path / "out", drop, mtp_heads="drop")
    assert "copied unpruned" not in caplog.text and info["mtp_tensors_dropped"] == len(mtp)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert not set(mtp) & set(f.keys())
    assert read_config(tmp_path / "out")[key] == 0
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["mtp_heads"] == "drop" and meta["dropped_mtp_tensors"] == sorted(mtp)
    load_family(family, tmp_path / "out")
    with pytest.raises(MoePruneError, match=r"prune.mtp_heads='prune': expected one of \['keep', 'drop'\]"):
        prune_checkpoint(src, tmp_path / "out2", drop, mtp_heads="prune")


def test_output_keeps_whole_page_rows_page_congruent_with_the_source(tmp_path):
    """Expert rows of whole pages land at the same offset within a page as in the source (the kernel
    then copies pages without shifting them), and the shard still reads back exactly."""
    from safetensors.torch import save_file

    rows = torch.arange(8 * 1024, dtype=torch.float32).reshape(8, 1024)  # 8 experts x 4096 bytes
    save_file({"a.odd": torch.ones(3, dtype=torch.float16), "b.experts": rows}, tmp_path / "src.safetensors")
    src = shards.read_header(tmp_path / "src.safetensors")[0]["b.experts"]
    assert src.start % 4096 != 0
    keep = [0, 2, 3, 7]
    pieces = [(src.file, src.start + e * 4096, 4096) for e in keep]
    out = shards.OutTensor("b.experts", "F32", (4, 1024), 4 * 4096, pieces=pieces)
    shards.write_shard(tmp_path / "out.safetensors", [out], {"format": "pt"})
    written = shards.read_header(tmp_path / "out.safetensors")[0]["b.experts"]
    assert written.start % 4096 == src.start % 4096
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("b.experts"), rows[keep])


def test_outputs_get_the_umask_modes_not_private_temp_modes(sources, tmp_path):
    """tempfile's 0600/0700 would survive the rename: a checkpoint others cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    prune_checkpoint(sources("qwen3_moe"), tmp_path / "out", {}, max_shard_bytes=20_000)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for name in ("config.json", "model.safetensors.index.json", METADATA_FILE):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name
