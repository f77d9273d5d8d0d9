"""Group-limited routing (DeepSeek-V3): the drop map stage chooses legal maps itself."""

import json

import numpy as np
import pytest

from moeprune.adapters import adapter_for
from moeprune.prune.selection import Protection, select_grouped
from tests.test_pipeline import moeprune, stage_dirs
from tests.tiny_moe import build_family


def _none(L):
    return [Protection(set(), {}) for _ in range(L)], [set() for _ in range(L)]


def test_same_count_per_group_keeps_each_groups_best():
    agg = np.array([[9, 1, 8, 2, 7, 3, 6, 4.0]])  # 2 groups of 4
    prot, bases = _none(1)
    dropped, info = select_grouped(agg, prot, bases, 2, [(2, 2)])
    assert dropped == [[1, 3, 5, 7]] and info["groups_kept"] == 2 and info["per_group"] == 2


def test_best_shape_wins_over_all_layers_and_whole_groups_can_go():
    # group 1 is useless in both layers: dropping it whole (1 group of 4) beats 2 per group
    agg = np.array([[9, 8, 7, 6, 1, 1, 1, 1.0], [5, 6, 7, 8, 0, 0, 1, 0.0]])
    prot, bases = _none(2)
    dropped, info = select_grouped(agg, prot, bases, 2, [(1, 4), (2, 2)])
    assert dropped == [[4, 5, 6, 7], [4, 5, 6, 7]] and (info["groups_kept"], info["per_group"]) == (1, 4)


def test_protected_experts_outrank_score_and_losses_are_counted():
    agg = np.array([[9, 8, 7, 6, 5, 4, 3, 2.0]])
    prot = [Protection({3, 7}, {})]
    dropped, info = select_grouped(agg, prot, [set()], 2, [(2, 2)])
    assert dropped == [[1, 2, 5, 6]] and info["protected_dropped"] == 0
    prot = [Protection({1, 2, 3}, {})]  # 3 protected in one group, 2 kept per group: one must go
    dropped, info = select_grouped(agg, prot, [set()], 2, [(2, 2)])
    assert info["protected_dropped"] == 1 and len(set(dropped[0]) & {1, 2, 3}) == 1


def test_deepseek_offers_only_legal_shapes():
    config = build_family("deepseek_v3").config.to_dict()  # 16 experts, 4 groups of 4, topk_group 2, top_k 3
    adapter = adapter_for(config)
    assert adapter.expert_groups(config, 12) == (4, [(3, 4), (4, 3)])
    assert adapter.expert_groups(config, 8) == (4, [(2, 4), (4, 2)])
    assert adapter.expert_groups(config, 5)[1] == []  # 5 = 1 x 5 (> group size) or 5 x 1: none legal
    with pytest.raises(Exception, match="cannot keep 5 experts per layer with group-limited routing"):
        adapter.validate_keep(config, 5)


def test_deepseek_run_builds_a_legal_map_and_prunes_it(tmp_path):
    from moeprune.toy.tokenizer import build_tokenizer

    model_dir = tmp_path / "tiny_deepseek"
    model = build_family("deepseek_v3", vocab_size=384, num_key_value_heads=2)  # MLA: kv heads = heads
    model.save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    args = [f"model.path={model_dir}", "calibration.samples_per_class=4", "keep.experts_per_layer=12",
            "stage=prune"]
    moeprune(args, tmp_path / "cache", tmp_path / "run")
    dirs = stage_dirs(tmp_path / "run")
    summary = json.loads((dirs["dropmap"] / "summary.json").read_text())
    assert summary["groups"]["n_group"] == 4 and summary["groups"]["legal_shapes"] == [[3, 4], [4, 3]]
    config = json.loads((dirs["prune"] / "model" / "config.json").read_text())
    assert config["n_routed_experts"] == 12 and config["n_group"] == summary["groups"]["groups_kept"]

    # the profile artifact alone, the model gone: the recorded config.json keeps the map legal, the same map
    moeprune([f"profile.path={dirs['profile']}", "model.path=/no/model/here", "keep.experts_per_layer=12",
              "stage=dropmap"], tmp_path / "cache_no_model", tmp_path / "run_no_model")
    alone = stage_dirs(tmp_path / "run_no_model")["dropmap"]
    assert json.loads((alone / "summary.json").read_text())["groups"] == summary["groups"]
    assert (alone / "drop_map.json").read_text() == (dirs["dropmap"] / "drop_map.json").read_text()

    out = moeprune([*args, "keep.mode=budget", "evaluate.virtual=true", "stage=all"], tmp_path / "cache2", tmp_path / "run2",
                   check=False)
    assert out.returncode == 2 and "keep.mode=budget cannot follow group-limited routing" in out.stderr
    assert not (tmp_path / "cache2").exists() or not any((tmp_path / "cache2").glob("*/*")), "refused before the profile"
