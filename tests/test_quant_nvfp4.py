"""NVFP4A16: a clear stop without a GPU; the export's reload and its evaluation on any machine, from a
synthetic export written from the format's definition; modelopt's quantize + export + reload on the
CPU with a pure-torch copy of its fake-quant kernel; on a CUDA machine, the same with modelopt's own
kernels, and the toy model's NVFP4 tier scored through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moeprune.errors import MoePruneError

# E2M1 (NVFP4's element format): sign bit 3, magnitude codes 0-7.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
SCALE_2 = 2.0 ** -6  # a power of two: the expected values are exact in every order of multiplication


def _nvfp4(rows: int, cols: int, gen: torch.Generator):
    """A random NVFP4 tensor as modelopt's exporter stores it (two E2M1 codes a byte, element 2k in the
    low nibble; one F8_E4M3 scale per 16 elements of a row; one F32 scale for the tensor) and the
    dense values it stands for."""
    codes = torch.randint(0, 16, (rows, cols), generator=gen)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    scale = (0.25 + 2 * torch.rand(rows, cols // 16, generator=gen)).to(torch.float8_e4m3fn)
    values = torch.tensor([(-1.0 if c >= 8 else 1.0) * E2M1[c % 8] for c in range(16)])
    dense = values[codes] * scale.float().repeat_interleave(16, dim=1) * SCALE_2
    return {"": packed, "_scale": scale, "_scale_2": torch.tensor(SCALE_2)}, dense.to(torch.bfloat16)


def write_synthetic_export(src: Path, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """An NVFP4A16 export of `src` in modelopt's layout: every routed expert unfused into
    experts.N.{gate,up,down}_proj and, like every attention projection, stored in NVFP4; the rest in
    bf16. Returns the dense bf16 state the export stands for, in transformers' fused layout."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    src_state = load_file(str(src / "model.safetensors"))
    stored, dense = {}, {}
    for name, t in src_state.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix, proj = name.rsplit(".", 1)
            per_expert = []
            for e in range(t.shape[0]):
                parts = []
                halves = [("gate_proj", t.shape[1] // 2), ("up_proj", t.shape[1] // 2)] if proj == "gate_up_proj" \
                    else [("down_proj", t.shape[1])]
                for sub, rows in halves:
                    tensors, values = _nvfp4(rows, t.shape[2], gen)
                    stored.update({f"{prefix}.{e}.{sub}.weight{k}": v for k, v in tensors.items()})
                    parts.append(values)
                per_expert.append(torch.cat(parts))
            dense[name] = torch.stack(per_expert)
        elif "self_attn" in name and name.endswith("_proj.weight"):
            tensors, dense[name] = _nvfp4(*t.shape, gen)
            stored.update({f"{name}{k}": v for k, v in tensors.items()})
        else:
            stored[name] = dense[name] = t.to(torch.bfloat16)
    out.mkdir(parents=True)
    save_file(stored, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "group_size": 16,
                                  "ignore": ["lm_head", "model.layers.*.router*"]}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy2(f, out / f.name)
    return dense


def test_a_synthetic_nvfp4_export_reloads_to_exactly_the_values_its_format_defines(tiny_gemma4, tmp_path):
    pytest.importorskip("modelopt", reason="pip install -e '.[nvfp4]' (nvidia-modelopt) to test the reload")
    from moeprune.quant import nvfp4

    dense = write_synthetic_export(tiny_gemma4, tmp_path / "export")
    model, quantized = nvfp4.reload(tmp_path / "export")
    state = model.state_dict()
    assert quantized == {k for k in dense if "experts." in k or "self_attn" in k and k.endswith("_proj.weight")}
    assert len(quantized) == 2 * 2 + 2 * 4  # two expert tensors and four attention projections per layer
    for name, want in dense.items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], want), name
    assert not model.training


def test_evaluate_quant_scores_an_nvfp4_export_as_its_dequantized_weights(tiny_gemma4, tmp_path):
    """The stage reloads the export and runs the bench on the hf backend: its completions are those of a
    plain bf16 checkpoint of the same weights, and the run table heads the column with the tier."""
    pytest.importorskip("modelopt", reason="pip install -e '.[nvfp4]' (nvidia-modelopt) to test the reload")
    from safetensors.torch import save_file
    from test_quant_tiers import compose_run

    from moeprune import artifacts, stages
    from moeprune.evaluate.bench_run import read_jsonl
    from moeprune.report import results_table
    from moeprune.runner import StageContext

    quant = tmp_path / "quant"
    dense = write_synthetic_export(tiny_gemma4, quant / "model")
    artifacts.write_json(quant / "quant-manifest.json", {
        "file": "model", "tier": {"name": "nvfp4a16", "kind": "nvfp4"}, "size_bytes": 1, "bits_per_weight": 4.5,
        "parameters": 1})
    plain = tmp_path / "plain"  # the same weights as an ordinary bf16 checkpoint
    plain.mkdir()
    save_file({k: v.contiguous() for k, v in dense.items()}, str(plain / "model.safetensors"))
    for f in tiny_gemma4.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, plain / f.name)
    small = ["bench.n_per_class=2", "backend.batch_size=16", "backend.max_new_tokens=8", "evaluate.resume=false",
             "model.device=cpu"]
    cfg = compose_run(f"model.path={plain}", "quant_tier=nvfp4a16", "model.dtype=bfloat16", *small)
    (tmp_path / "q").mkdir()
    (tmp_path / "p").mkdir()
    got = stages.run_evaluate_quant(StageContext(cfg, tmp_path / "q", {"quant": quant}))
    want = stages.run_evaluate_base(StageContext(cfg, tmp_path / "p", {}))
    assert got["n"] == want["n"] == 12 and got["score"] == want["score"]
    assert [r["completion"] for r in read_jsonl(tmp_path / "q" / "samples.jsonl")] == \
        [r["completion"] for r in read_jsonl(tmp_path / "p" / "samples.jsonl")]
    assert got["tier"] == "nvfp4a16" and "## Scores" in (tmp_path / "q" / "README.md").read_text()
    table = results_table({"evaluate_base": want, "evaluate": want, "quant": {"type": None, "tier": "nvfp4a16"},
                           "evaluate_quant": got})
    assert table.splitlines()[0].split() == ["class", "base", "pruned", "nvfp4a16", "delta"]


def nvfp4_fake_quant_cpu(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
    """modelopt's dynamic NVFP4 fake-quant op as plain torch, for the CPU, where modelopt asserts CUDA.
    A line-by-line copy of the kernel it dispatches to on Hopper (modelopt/torch/kernels/quantization/
    gemm/fp4_kernel_hopper.py, fp4_fake_quant_kernel, with common/nvfp4_quant.py's rounding): global
    scale amax / (6 * 448); per 16 elements, block max / 6 in units of it, saturated at 448 and cast to
    E4M3; |x| / scale rounded to the nearest E2M1 magnitude, ties as the kernel breaks them."""
    assert (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4), "NVFP4 only"
    shape, dtype = inputs.shape, inputs.dtype
    x = inputs.reshape(-1, shape[-1]).float().unflatten(-1, (-1, block_size))
    gs = amax.float().amax() / (6.0 * 448.0)
    gs = torch.where(gs > 0, gs, torch.tensor(1e-12))
    scale = torch.clamp(x.abs().amax(-1, keepdim=True) / (6.0 * gs), max=448.0).to(torch.float8_e4m3fn).float() * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    a = x.abs() / scale
    q = torch.zeros_like(a)  # E2M1 magnitudes; even codes win ties (<= at 0.25, 1.25, 2.5, 5.0; < elsewhere)
    for bound, value, inclusive in [(0.25, 0.5, True), (0.75, 1.0, False), (1.25, 1.5, True), (1.75, 2.0, False),
                                    (2.5, 3.0, True), (3.5, 4.0, False), (5.0, 6.0, True)]:
        q = torch.where(a > bound if inclusive else a >= bound, value, q)
    return torch.where(x >= 0, q * scale, -q * scale).reshape(shape).to(dtype)


@pytest.mark.parametrize("amax_factor", [1.0, 1.3])
def test_the_cpu_copy_of_modelopts_nvfp4_kernel_rounds_as_modelopts_exporter(amax_factor):
    """The stand-in the CPU tests use agrees bit for bit with the exporter's own NVFP4QTensor quantize
    and dequantize, at the tensor's own amax and at a larger shared one (a fused group's)."""
    pytest.importorskip("modelopt", reason="pip install -e '.[nvfp4]' (nvidia-modelopt)")
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 256, generator=gen) * torch.rand(96, 1, generator=gen) * 0.1).to(torch.bfloat16)
    w[3, 16:32] = 0  # an all-zero block
    amax = w.float().abs().amax() * amax_factor
    packed, scale, scale_2 = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=amax / (6.0 * 448.0))
    want = packed.dequantize(dtype=torch.bfloat16, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    got = nvfp4_fake_quant_cpu(w, 16, amax, 4, 2, 8, 4)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert 0.05 < float((got.float() - w.float()).norm() / w.float().norm()) < 0.2  # 4-bit rounding happened


def test_the_tie_mask_holds_every_element_whose_code_a_float32_division_rounding_could_flip():
    """Where |x| / scale is a float32 rounding away from an E2M1 decision boundary, or a block's
    unrounded scale one away from an E4M3 rounding midpoint, an exact division and one off by an ulp
    pick neighbouring codes; the mask must cover all those elements and only a sliver of the rest."""
    from moeprune.quant.nvfp4 import E2M1_BOUNDARIES, near_rounding_tie

    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(256, 512, generator=gen) * 0.02).to(torch.bfloat16)
    amax = w.float().abs().amax()  # its own amax, as an expert's: where scale ties come up
    near = near_rounding_tie(w, amax).reshape(-1, 16)
    x = w.float().reshape(-1, 16)
    gs = amax / (6.0 * 448.0)
    unrounded = torch.clamp(x.abs().amax(-1, keepdim=True) / (6.0 * gs), max=448.0)
    scale = (unrounded.to(torch.float8_e4m3fn).float() * gs).expand_as(x)
    exact = x.abs() / scale  # IEEE float32, as the exporter
    code_flip, scale_flip = torch.zeros_like(exact, dtype=torch.bool), torch.zeros_like(unrounded, dtype=torch.bool)
    for ulps in (-2, -1, 1, 2):  # a division that lands this many ulps away
        off = exact + ulps * torch.finfo(torch.float32).eps * exact
        for b in E2M1_BOUNDARIES:
            code_flip |= (exact >= b) != (off >= b)
        off_scale = (unrounded * (1 + ulps * torch.finfo(torch.float32).eps)).to(torch.float8_e4m3fn).float()
        scale_flip |= off_scale != unrounded.to(torch.float8_e4m3fn).float()
    assert code_flip.sum() > 100 and not (code_flip & ~near).any()
    assert scale_flip.sum() > 10 and near[scale_flip.squeeze(-1)].all()
    assert near.float().mean() < 2e-2


@pytest.mark.parametrize("share", [True, False], ids=["shared", "own_amax"])
def test_the_nvfp4_export_holds_modelopts_fake_quant_weights_once_fused_linears_share_a_global_scale(
        tiny_gemma4, tmp_path, monkeypatch, share):
    """modelopt quantizes, exports and reloads the tiny Gemma 4 on the CPU (its fake-quant op replaced by
    the copy above). The export gives q/k/v and gate/up one global scale, their group's largest amax:
    compared with fake-quant weights read after that step the reload agrees exactly, Linears and experts;
    read before it (each Linear's own amax), the group's other members are a 4-bit rounding apart."""
    pytest.importorskip("modelopt", reason="pip install -e '.[nvfp4]' (nvidia-modelopt)")
    import modelopt.torch.quantization.tensor_quant as tensor_quant
    from quant_support import toy_corpus

    from moeprune.quant import nvfp4

    monkeypatch.setattr(tensor_quant, "dynamic_block_quantize_op", nvfp4_fake_quant_cpu)
    if not share:
        monkeypatch.setattr(nvfp4, "_share_fused_global_scales", lambda model: 0)
    m = nvfp4._produce(tiny_gemma4, tmp_path / "q", toy_corpus(2), samples_per_class=2, max_tokens=32,
                       batch_size=16, device="cpu")
    r = m["reload"]
    assert r["quantized_tensors"] == 2 * (4 + 3 + 2)  # per layer: q/k/v/o, the dense MLP, the experts
    assert r["fakequant_tensors_checked"] == 2 * (4 + 3 + 2) == len(r["fakequant_by_tensor"])
    assert r["max_rel_diff_vs_fakequant_expert_weights"] < 1e-6  # one amax per expert's gate_up: nothing to share
    assert 0 < r["fakequant_at_tie"] < r["fakequant_elements_checked"] / 50
    if share:  # the CPU copy divides as the exporter does: not even the elements at a tie differ
        assert r["shared_global_scales"] >= 2  # per layer, q/k/v and gate/up cannot all own their group's max
        assert r["max_rel_diff_vs_fakequant_linear_weights"] < 1e-6 and r["fakequant_mismatches"] == 0
    else:
        assert 0.05 < r["max_rel_diff_vs_fakequant_linear_weights"] < 0.2  # what the H200 run reported
        assert r["fakequant_mismatches_off_tie"] > r["fakequant_elements_checked"] / 100
    assert 0.02 < r["weight_rel_err"]["max"] < 0.2 and m["bits_per_weight"] < 8
    assert (tmp_path / "q" / "model" / "config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_nvfp4_tier_says_it_needs_a_gpu(tiny_gemma4, tmp_path):
    from moeprune.quant.stage import quantize
    from test_quant_tiers import compose_run

    cfg = compose_run(f"model.path={tiny_gemma4}", "quant_tier=nvfp4a16")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MoePruneError, match="nvfp4a16 needs a CUDA GPU"):
        quantize(cfg.quant_tier, cfg.calibration, cfg.model.name, tiny_gemma4, None, out, tmp_path / "cache")
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
    # the export holds modelopt's weights (read once q/k/v and gate/up share their export global scale),
    # element for element but at rounding ties, where the GPU kernel's division and the exporter's differ
    r = m["reload"]
    assert r["fakequant_mismatches_off_tie"] == 0, r["fakequant_by_tensor"]
    assert r["fakequant_mismatches"] < r["fakequant_elements_checked"] / 50
    assert r["fakequant_tensors_checked"] == 2 * (4 + 3 + 2) and r["shared_global_scales"] > 0
    assert 0.02 < m["reload"]["weight_rel_err"]["max"] < 0.2  # 4-bit rounding, not garbage
    assert m["bits_per_weight"] < 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_a_run_asking_for_nvfp4_stops_before_the_profile(tiny_gemma4, tmp_path):
    from test_pipeline import SMALL, moeprune

    proc = moeprune([f"model.path={tiny_gemma4}", *SMALL, "quant_tier=nvfp4a16"], tmp_path / "cache", tmp_path / "run",
                    check=False)
    assert proc.returncode == 2 and "nvfp4a16 needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*/*")), "nothing was built"


NVFP4_TOLERANCE = 0.05  # NVFP4A16 vs the pruned bf16 model on the toy suite, absolute (5 points)


@pytest.mark.gpu
def test_the_cli_scores_the_toy_models_nvfp4_tier_within_tolerance_of_pruned_bf16(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import importlib.util

    assert importlib.util.find_spec("modelopt"), "pip install -e '.[nvfp4]' (nvidia-modelopt) to test NVFP4A16"
    from test_pipeline import moeprune

    proc = moeprune(["quant_tier=nvfp4a16", "bench.n_per_class=20"], tmp_path / "cache", tmp_path / "run")
    assert "evaluate_quant skipped" not in proc.stdout + proc.stderr
    header = next(line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("class "))
    assert header.split() == ["class", "base", "pruned", "nvfp4a16", "delta"]
    stages = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]
    pruned, quant = stages["evaluate"], stages["evaluate_quant"]
    assert quant["n"] == pruned["n"] == 120 and quant["tier"] == "nvfp4a16"
    assert abs(quant["score"] - pruned["score"]) <= NVFP4_TOLERANCE, (quant["score"], pruned["score"])
