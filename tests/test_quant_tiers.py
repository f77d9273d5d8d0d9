"""The quant_tier presets: the whole reference ladder exists, composes through Hydra, and bad tiers
fail before any tool runs."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from moeprune.errors import MoePruneError
from moeprune.presets import quant_tier
from moeprune.quant import tiers

LADDER = ["f16", "q8_0", "q6_k", "q6_k_l", "q5_k_s", "q5_k_m", "q5_k_l", "q4_k_s", "q4_k_m", "q4_k_l", "q4_0",
          "q4_1", "iq4_nl", "iq4_xs", "q3_k_s", "q3_k_m", "q3_k_l", "q3_k_xl", "iq3_m", "iq3_xs", "iq3_xxs",
          "iq2_m", "iq2_s", "iq2_xs"]
CD = ["cd_q6_k", "cd_q5_k_m", "cd_q4_k_m", "cd_iq4_k_m", "cd_q3_k_m"]


def compose_run(*overrides):
    import moeprune.cli  # noqa: F401  (registers the schema and the moeprune_pkg resolver)

    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


@pytest.mark.parametrize("name", LADDER + CD + ["nvfp4a16", "none"])
def test_every_preset_loads_validates_and_composes(name):
    tier = quant_tier(name)
    assert tier.name == name
    tiers.validate(tier)
    cfg = compose_run(f"quant_tier={name}")
    assert OmegaConf.to_container(cfg.quant_tier) == OmegaConf.to_container(tier)


def test_imatrix_policy_matches_the_reference_ladder():
    for name in LADDER + CD:
        tier = quant_tier(name)
        if name in ("f16", "q8_0", "q4_0", "q4_1"):
            assert not tier.imatrix, name  # never on Q8_0 / Q4_0 / Q4_1 (and nothing to do for F16)
        else:
            assert tier.imatrix, name
    for name in ("q6_k_l", "q5_k_l", "q4_k_l", "q3_k_xl"):
        tier = quant_tier(name)
        assert (tier.token_embedding_type, tier.output_tensor_type) == ("q8_0", "q8_0")
    assert all(quant_tier(n).cd is not None for n in CD)


def test_unknown_tier_is_named_with_the_choices():
    with pytest.raises(MoePruneError, match=r"unknown quant tier 'q9_k'.*q4_k_m"):
        quant_tier("q9_k")
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="quant_tier/q9_k"):
        compose_run("quant_tier=q9_k")


@pytest.mark.parametrize("override, message", [
    ({"type": "Q9_K"}, r"type='Q9_K' is not a llama-quantize type"),
    ({"type": None}, r"type=None is not a llama-quantize type"),
    ({"type": "IQ4_XS", "imatrix": False}, r"IQ4_XS needs an importance matrix"),
    ({"type": "F16", "imatrix": True}, r"does nothing for F16"),
    ({"token_embedding_type": "q9"}, r"token_embedding_type='q9' is not a ggml type"),
    ({"tensor_types": {"attn_v": "int3"}}, r"tensor_types\['attn_v'\]='int3'"),
    ({"cd": {"high_type": "q8_0", "mid_type": "q4_k", "low_type": "q2"}}, r"cd.low_type='q2'"),
    ({"cd": {"high_type": "q8_0", "mid_type": "q4_k", "low_type": "q3_k", "high_fraction": 0.7,
             "low_fraction": 0.5}}, r"sum is at most 1"),
    ({"imatrix_ctx": 2}, r"imatrix_ctx=2"),
    ({"imatrix": False, "cd": {"high_type": "q8_0", "mid_type": "q4_k", "low_type": "iq3_xxs"}},
     r"cd.low_type=iq3_xxs is an IQ type, which needs an importance matrix"),
    ({"imatrix": False, "tensor_types": {"attn_v": "iq4_xs"}}, r"tensor_types\['attn_v'\]=iq4_xs is an IQ type"),
    ({"type": "F16", "imatrix": False, "tensor_types": {"attn_v": "q8_0"}}, r"F16 is not quantized"),
    ({"tensor_types": {"blk\\.(": "q8_0"}}, r"is not a regular expression"),
])
def test_bad_tier_fields_are_refused(override, message):
    tier = OmegaConf.merge(quant_tier("q4_k_m"), override)
    with pytest.raises(MoePruneError, match=message):
        tiers.validate(tier)


@pytest.mark.parametrize("tier, override, message", [
    ("nvfp4a16", {"imatrix": True, "type": "Q4_K_M"},
     r"quant_tier.type=Q4_K_M, quant_tier.imatrix=True is set, but a nvfp4 tier has no such knob; its knobs: calib_samples"),
    ("q4_k_m", {"calib_samples": 8}, r"quant_tier.calib_samples=8 is set, but a gguf tier has no such knob"),
])
def test_a_knob_of_another_tier_kind_is_refused(tier, override, message):
    with pytest.raises(MoePruneError, match=message):
        tiers.validate(OmegaConf.merge(quant_tier(tier), override))


def test_the_cli_refuses_an_nvfp4_tier_with_gguf_knobs_in_one_line(tmp_path):
    from test_pipeline import moeprune

    proc = moeprune(["quant_tier=nvfp4a16", "quant_tier.imatrix=true", "quant_tier.type=Q4_K_M"], tmp_path / "cache",
                    tmp_path / "run", check=False)
    assert proc.returncode == 2 and "a nvfp4 tier has no such knob" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_evaluate_quant_runs_a_gguf_through_the_llama_cpp_preset_pointed_at_the_file(tmp_path):
    from moeprune import artifacts
    from moeprune.stages.quant import eval_backend

    artifacts.write_json(tmp_path / "quant-manifest.json", {"file": "m-Q4_K_M.gguf", "tier": {"kind": "gguf"}})
    cfg = compose_run("backend=hf", "backend.max_new_tokens=7")
    backend, dtype, path, extra = eval_backend(cfg.backend, "cpu", tmp_path)
    assert (backend.name, backend.gguf, backend.max_new_tokens, backend.concurrency) == (
        "llama_cpp", str(tmp_path / "m-Q4_K_M.gguf"), 7, 2)  # the preset's own concurrency
    assert (dtype, path, extra) == (None, tmp_path, {})
    assert cfg.backend.name == "hf", "the run's own backend node is left as it was"
    artifacts.write_json(tmp_path / "quant-manifest.json", {"file": "model", "tier": {"kind": "gguf"}})
    with pytest.raises(MoePruneError, match="evaluate_quant runs GGUF files"):
        eval_backend(cfg.backend, "cpu", tmp_path)
