"""Layer-wise profiling from the shards equals whole-model profiling; killed runs resume exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_moe  # noqa: E402
from test_profile import mla_fixed, random_corpus  # noqa: E402

from moeprune.adapters import adapter_for  # noqa: E402
from moeprune.errors import MoePruneError  # noqa: E402
from moeprune.models import read_config  # noqa: E402
from moeprune.prune.profile import layerwise as lw  # noqa: E402
from moeprune.prune.profile import profile_model  # noqa: E402

KW = dict(batch_size=3, batch_tokens=40)


def saved(family: str, path: Path, **kw) -> Path:
    with mla_fixed():
        return tiny_moe.save_family(family, path, **kw)


def whole(path: Path, family: str, corpus, **kw):
    model = tiny_moe.load_family(family, path)
    model.set_experts_implementation("grouped_mm")
    return profile_model(model, adapter_for(read_config(path)), corpus, **KW, **kw)


def assert_same(a, b, rtol=1e-5):
    assert a.layers == b.layers and a.classes == b.classes
    for k in b.stats:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("family", tiny_moe.FAMILIES)
def test_layerwise_statistics_equal_whole_model(family, tmp_path):
    path = saved(family, tmp_path / "m", max_shard_size="20KB")  # several shards: layers span files
    assert len(list(path.glob("*.safetensors"))) > 1
    corpus = random_corpus(96)
    ref = whole(path, family, corpus, neuron_energy=True)
    adapter = adapter_for(read_config(path))
    got = lw.profile_layerwise(path, adapter, corpus, tmp_path / "work", **KW, neuron_energy=True)
    assert_same(got, ref)
    assert not (tmp_path / "work").exists(), "a finished run removes its checkpoints"


def test_hidden_states_past_the_ram_budget_go_to_a_memory_map(tmp_path):
    path = saved("qwen3_moe", tmp_path / "m")
    corpus = random_corpus(96)
    adapter = adapter_for(read_config(path))
    ram = lw.profile_layerwise(path, adapter, corpus, tmp_path / "w1", **KW)
    mapped = lw.profile_layerwise(path, adapter, corpus, tmp_path / "w2", **KW, hidden_ram_bytes=0)
    assert ram.meta["hidden_states"] == "ram" and mapped.meta["hidden_states"] == "memmap"
    assert_same(mapped, ram, rtol=0)


KILL = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_profile import random_corpus
from moeprune.adapters import adapter_for
from moeprune.models import read_config
from moeprune.prune.profile import layerwise as lw

commit = lw.Checkpoints.commit
def dying_commit(self, k, hidden, stats):
    if k == 2:  # killed while layer 1's outputs are half written: the tmp file exists, nothing renamed
        (self.work / "hidden_2.bin.tmp").write_bytes(b"partial")
        os._exit(9)
    commit(self, k, hidden, stats)
lw.Checkpoints.commit = dying_commit
path = Path({path!r})
lw.profile_layerwise(path, adapter_for(read_config(path)), random_corpus(96), Path({work!r}), batch_size=3,
                     batch_tokens=40, hidden_ram_bytes={ram})
"""


def test_at_most_two_hidden_state_buffers_are_alive_and_the_budget_counts_both(tmp_path, monkeypatch):
    import gc
    import weakref

    path = saved("qwen3_moe", tmp_path / "m")
    corpus = random_corpus(96)
    alive, peak = [], []

    def tracked(method):
        def wrapper(self, k):
            t = method(self, k)
            gc.collect()
            alive.append(weakref.ref(t))
            peak.append(sum(r() is not None for r in alive))
            return t
        return wrapper

    monkeypatch.setattr(lw.Checkpoints, "new_hidden", tracked(lw.Checkpoints.new_hidden))
    monkeypatch.setattr(lw.Checkpoints, "hidden", tracked(lw.Checkpoints.hidden))
    lw.profile_layerwise(path, adapter_for(read_config(path)), corpus, tmp_path / "w", **KW)
    layers = read_config(path)["num_hidden_layers"]
    assert len(peak) == layers + 1 and max(peak) == 2  # a layer's inputs and outputs, nothing else

    one = lw.Checkpoints(tmp_path / "c", "k", rows=1000, hidden=32, dtype=torch.float32, ram_bytes=0, pin=False)
    size = 1000 * 32 * 4
    assert lw.Checkpoints(tmp_path / "c", "k", 1000, 32, torch.float32, 2 * size, False).in_ram
    assert not lw.Checkpoints(tmp_path / "c", "k", 1000, 32, torch.float32, 2 * size - 1, False).in_ram
    assert not one.in_ram


@pytest.mark.parametrize("ram", [0])  # hidden states in the memory map: the harder case to resume
def test_a_killed_run_resumes_at_the_last_finished_layer_with_identical_statistics(tmp_path, ram):
    path = saved("deepseek_v3", tmp_path / "m")  # 3 layers, the first dense
    work = tmp_path / "work"
    script = KILL.format(tests=str(Path(__file__).parent), path=str(path), work=str(work), ram=ram)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert json.loads((work / "state.json").read_text())["done"] == 1

    loaded = []
    original = lw.LayerLoader.layer
    lw.LayerLoader.layer = lambda self, i: loaded.append(i) or original(self, i)
    try:
        adapter = adapter_for(read_config(path))
        resumed = lw.profile_layerwise(path, adapter, random_corpus(96), work, **KW, hidden_ram_bytes=ram)
    finally:
        lw.LayerLoader.layer = original
    assert loaded == [1, 2], "layer 0 was finished before the kill and must not run again"
    fresh = lw.profile_layerwise(path, adapter, random_corpus(96), tmp_path / "fresh", **KW, hidden_ram_bytes=ram)
    assert_same(resumed, fresh, rtol=0)


def test_refusals(tmp_path):
    path = saved("mixtral", tmp_path / "m")
    adapter = adapter_for(read_config(path))
    work = tmp_path / "work"
    lw.profile_layerwise(path, adapter, random_corpus(96), work, **KW, keep_work=True)
    with pytest.raises(MoePruneError, match="holds a layer-wise run of another model/corpus/config"):
        lw.profile_layerwise(path, adapter, random_corpus(96, seed=1), work, **KW)
    shard = next(path.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=r"layer 1 is missing tensors \['model.layers.1.self_attn.q_proj.weight'\]"):
        lw.profile_layerwise(path, adapter, random_corpus(96), tmp_path / "w2", **KW)

    from conftest import tiny_gemma4_config
    from transformers import Gemma4ForCausalLM

    shared = tmp_path / "shared_kv"
    config = tiny_gemma4_config(layers=4)
    config.layer_types, config.num_kv_shared_layers = ["sliding_attention", "full_attention"] * 2, 2
    Gemma4ForCausalLM(config).save_pretrained(shared)
    with pytest.raises(MoePruneError, match="shares KV caches across layers"):
        lw.profile_layerwise(shared, adapter_for(read_config(shared)), random_corpus(96), tmp_path / "w3", **KW)
