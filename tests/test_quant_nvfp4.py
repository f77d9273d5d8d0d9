"""NVFP4A16: a clear stop without a GPU; on a CUDA machine, quantize + export + reload a tiny Gemma 4."""

from __future__ import annotations

import json

import pytest
import torch

from moeprune.errors import MoePruneError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_nvfp4_tier_says_it_needs_a_gpu(tiny_gemma4, tmp_path):
    from moeprune.quant.stage import quantize
    from test_quant_tiers import compose_run

    cfg = compose_run(f"model.path={tiny_gemma4}", "quant_tier=nvfp4a16")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MoePruneError, match="nvfp4a16 needs a CUDA GPU"):
        quantize(cfg, tiny_gemma4, None, out)
    assert list(out.iterdir()) == []


@pytest.mark.gpu
def test_nvfp4_export_reloads_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import importlib.util

    # on a GPU machine a missing modelopt is a setup error, not a reason to skip the tier's only test
    assert importlib.util.find_spec("modelopt"), "pip install -e '.[nvfp4]' (nvidia-modelopt) to test NVFP4A16"
    from quant_support import save_gguf_ready_gemma4, toy_corpus

    from moeprune.quant import nvfp4

    model = save_gguf_ready_gemma4(tmp_path / "m")
    m = nvfp4.produce(model, tmp_path / "q", toy_corpus(8), samples_per_class=8, max_tokens=64)
    cfg = json.loads((tmp_path / "q" / "model" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_algo"] == "W4A16_NVFP4"
    assert m["reload"]["quantized_tensors"] > 0
    assert m["reload"]["max_rel_diff_vs_fakequant_linear_weights"] < 1e-2  # the export holds modelopt's weights
    assert 0.02 < m["reload"]["weight_rel_err"]["max"] < 0.2  # 4-bit rounding, not garbage
    assert m["bits_per_weight"] < 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_a_run_asking_for_nvfp4_stops_before_the_profile(tiny_gemma4, tmp_path):
    from test_pipeline import SMALL, moeprune

    proc = moeprune([f"model.path={tiny_gemma4}", *SMALL, "quant_tier=nvfp4a16"], tmp_path / "cache", tmp_path / "run",
                    check=False)
    assert proc.returncode == 2 and "nvfp4a16 needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*/*")), "nothing was built"
