"""The profile stage through the composed config: a user corpus preset, caching by content, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

import moeprune.cli  # noqa: F401  (registers the schema and resolvers)
from moeprune.errors import MoePruneError
from moeprune.profile import Profile

PRESET = """\
name: mine
classes:
  code: [{kind: jsonl, path: %(corpus)s}]
  math: [{kind: toy, path: generic_math, limit: 6}, {kind: text, path: %(text)s, tier: long}]
tiers:
  short: {max_tokens: 32}
  long: {max_tokens: 16, weight: 3.0, overflow: window}
samples_per_class: null
"""


def run_profile(tmp_path: Path, model: Path, *overrides: str) -> dict:
    (tmp_path / "run").mkdir(exist_ok=True)  # hydra makes the run dir; composing in-process does not
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "calibration=mine", f"model.path={model}",
            f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", "stage=profile",
            "profile.progress=false", *overrides])
    return moeprune.cli.run(cfg)["profile"]


@pytest.fixture
def user_preset(tmp_path):
    corpus = tmp_path / "code.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(): return {i}"}) + "\n" for i in range(4)))
    text = tmp_path / "long.txt"
    text.write_text("print('hello world, this is a long line to window')\n")
    (tmp_path / "conf" / "calibration").mkdir(parents=True)
    (tmp_path / "conf" / "calibration" / "mine.yaml").write_text(PRESET % {"corpus": corpus, "text": text})
    return corpus


def test_profile_stage_caches_by_content_and_records_the_corpus(tmp_path, tiny_gemma4, user_preset):
    first = run_profile(tmp_path, tiny_gemma4)
    assert not first["cached"] and first["classes"] == ["code", "math"] and first["mode"] == "whole"
    assert run_profile(tmp_path, tiny_gemma4)["cached"]
    art = Path(json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["profile"]["artifact"])
    prof = Profile.load(art)
    assert set(prof.meta["tokens_per_class_tier"]["math"]) == {"short", "long"}
    assert prof.meta["passes_per_class"]["math"] == 6 + 4  # 52 tokens in 16-token windows
    assert prof["count"].shape == (2, 2, 8) and prof["weight_norm"].shape == (2, 8)
    manifest = json.loads((art / "manifest.json").read_text())
    assert "calibration.code[0]" in manifest["external"]
    # editing the corpus file re-profiles; a knob outside the profile's slice does not
    assert run_profile(tmp_path, tiny_gemma4, "profile.progress=true")["cached"]
    user_preset.write_text(user_preset.read_text() + json.dumps({"text": "one more"}) + "\n")
    again = run_profile(tmp_path, tiny_gemma4)
    assert not again["cached"] and again["tokens"] > first["tokens"]


def test_profile_stage_refuses_bad_input(tmp_path, tiny_gemma4, user_preset):
    from conftest import save_tiny_gemma4

    with pytest.raises(ConfigCompositionException) as e:  # an enum knob: refused when the config composes
        run_profile(tmp_path, tiny_gemma4, "profile.mode=fast")
    assert "Invalid value 'fast', expected one of [auto, whole, layerwise]" in str(e.value.__cause__)
    dense = save_tiny_gemma4(tmp_path / "dense")
    cfg = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**cfg, "enable_moe_block": False}))
    with pytest.raises(MoePruneError, match="no MoE layers"):
        run_profile(tmp_path, dense)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MoePruneError, match="unsupported architecture model_type='llama'"):
        run_profile(tmp_path, llama)
    assert not list((tmp_path / "cache" / "profile").glob("*/manifest.json")), "a failed stage must leave nothing"


def test_layerwise_mode_through_the_stage_equals_whole(tmp_path, tiny_gemma4, user_preset):
    import torch

    def artifact():
        return Path(json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["profile"]["artifact"])

    assert run_profile(tmp_path, tiny_gemma4)["mode"] == "whole"
    ref = Profile.load(artifact())
    got = run_profile(tmp_path, tiny_gemma4, "profile.mode=layerwise", "cache.refresh=true")
    assert got["mode"] == "layerwise"
    prof = Profile.load(artifact())
    for k in ref.stats:
        torch.testing.assert_close(prof[k], ref[k], rtol=1e-5, atol=1e-9)
    work = tmp_path / "cache" / "profile_layerwise"
    assert not work.exists() or not any(work.iterdir()), "a finished layer-wise run leaves no checkpoints"
    with pytest.raises(MoePruneError, match="generate_tokens needs the whole model"):
        run_profile(tmp_path, tiny_gemma4, "profile.mode=layerwise", "calibration.generate_tokens=4")
