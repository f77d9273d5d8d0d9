"""NVFP4A16 via nvidia-modelopt: 4-bit E2M1 weights in 16-element blocks (FP8 E4M3 block scales and an
FP32 global scale), 16-bit activations; exported as a Hugging Face checkpoint vLLM loads
(quantization_config in config.json; routers and lm_head stay 16-bit).

modelopt's NVFP4 block quantizer needs CUDA tensors, so on a machine without a GPU this tier stops
with an error saying so before loading anything. After the export we reload it: every packed weight
is dequantized with modelopt's own NVFP4QTensor, the per-expert tensors are fused back into
transformers' layout, and the rebuilt model is checked against modelopt's fake-quantized one (the
first and last layers' Linear and expert weights, element by element: `fakequant_mismatches_off_tie`,
which the tests hold at 0, counts elements that differ anywhere but at a rounding tie, where the GPU
kernels and the exporter may round either way) and against the 16-bit model (the quantization
error); both go in the manifest. The fake-quant reference is read after the exporter's first step,
which gives Linears that vLLM fuses (q/k/v, gate/up) one shared NVFP4 global scale: read before it,
the group's other members round with block scales the export does not use (`_share_fused_global_scales`).

The same reload is what `evaluate_quant` scores: W4A16 keeps activations in 16 bits, so a model whose
weights are the dequantized 4-bit values computes the products an NVFP4A16 kernel computes.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeprune import artifacts, schema
from moeprune.errors import MoePruneError
from moeprune.quant.tiers import QuantTierConfig, Scoring, kind_knob

if TYPE_CHECKING:  # torch is imported where it runs: registering this tier's schema must not load it
    import torch

EXPORT_DIR = "model"
_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")



@schema.schema("quant_tier", "nvfp4")
@dataclass
class Nvfp4TierConfig(QuantTierConfig):
    """An NVFP4A16 tier (modelopt on a CUDA GPU); torch is imported inside the functions below, so
    registering this schema (every command) does not load it."""

    kind: str = kind_knob("nvfp4")
    # calibration texts per class for modelopt's amax pass
    calib_samples: int = schema.knob(32, lambda v: v >= 1, "at least 1 calibration text per class")

    @classmethod
    def preflight(cls, tier) -> None:
        require_gpu()  # CUDA + modelopt: known before any profile or surgery

    @classmethod
    def quantize(cls, tier, job) -> dict:
        from omegaconf import OmegaConf

        require_gpu()  # before the corpus is built: a direct caller stops here with the reason
        manifest = produce(job.model_dir, job.out_dir, job.corpus(), tier.calib_samples,
                           max(t.max_tokens for t in job.calibration.tiers.values()))
        return {**manifest, "tier": OmegaConf.to_container(tier, resolve=True)}

    @classmethod
    def scoring(cls, quant_dir: Path, manifest: dict, device: str) -> Scoring:
        """The export dequantized into a transformers model on `device`, scored on the hf backend:
        W4A16 keeps activations in 16 bits, so the dequantized weights compute the same products."""
        from moeprune.models import pick_device

        export = Path(quant_dir) / manifest["file"]
        model, _ = reload(export, pick_device(device))
        return Scoring("hf", export, dtype="bfloat16", runtime={"model": model})


def require_gpu() -> None:
    import torch
    if not torch.cuda.is_available():
        raise MoePruneError("quant_tier nvfp4a16 needs a CUDA GPU (modelopt's NVFP4 block quantizer runs on "
                            "CUDA tensors only) and none is visible here; run this tier on a GPU machine")
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        raise MoePruneError("nvidia-modelopt is not installed: expected `pip install -e '.[nvfp4]'`") from None


def _batches(texts: list[str], size: int):
    for i in range(0, len(texts), size):
        yield texts[i:i + size]


def produce(model_dir: Path, out_dir: Path, corpus: dict[str, list[str]], samples_per_class: int,
            max_tokens: int, batch_size: int = 16) -> dict:
    require_gpu()
    return _produce(model_dir, out_dir, corpus, samples_per_class, max_tokens, batch_size, "cuda")


def _produce(model_dir: Path, out_dir: Path, corpus: dict[str, list[str]], samples_per_class: int,
             max_tokens: int, batch_size: int, device: str) -> dict:
    """`produce` on `device`; only "cuda" runs modelopt's real kernels (the CPU is for tests that
    stand in a pure-torch copy of the fake-quant kernel)."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    from moeprune.models import load_model, load_tokenizer
    from moeprune.checkpoint import parameter_count

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir, "bfloat16", device)
    if not model.config.architectures:  # modelopt's exporter keys on it (TypeError on None)
        model.config.architectures = [type(model).__name__]
    tok = load_tokenizer(model_dir)
    texts = [t for texts in corpus.values() for t in texts[:samples_per_class]]
    if not texts:
        raise MoePruneError("the calibration corpus is empty: expected texts for modelopt's amax calibration")
    probe = tok(texts[:8], return_tensors="pt", padding=True, truncation=True, max_length=max_tokens).to(device)
    with torch.no_grad():
        ref_logits = model(**probe).logits.float()

    def forward_loop(m):
        with torch.no_grad():
            for batch in _batches(texts, batch_size):
                m(**tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens).to(device))

    t0 = time.perf_counter()
    mtq.quantize(model, mtq.W4A16_NVFP4_CFG, forward_loop)
    quant_s = time.perf_counter() - t0
    shared = _share_fused_global_scales(model)
    fake_linear, fake_experts = _fakequant_weights(model)
    t0 = time.perf_counter()
    with artifacts.atomic_dir(out_dir / EXPORT_DIR) as tmp:
        export_hf_checkpoint(model, export_dir=tmp)
        for p in model_dir.iterdir():  # tokenizer, generation config
            if p.name.startswith("tokenizer") or p.name in ("generation_config.json", "chat_template.jinja",
                                                             "special_tokens_map.json"):
                shutil.copy2(p, tmp / p.name)
    export_s = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()

    export = out_dir / EXPORT_DIR
    reloaded, quantized = reload(export, device)
    weight_err = _weight_errors(model_dir, reloaded, quantized)
    with torch.no_grad():
        re_logits = reloaded(**probe).logits.float()
    mask = probe["attention_mask"].bool()
    qcfg = json.loads((export / "config.json").read_text()).get("quantization_config", {})
    size = sum(p.stat().st_size for p in export.glob("*.safetensors"))
    params = parameter_count(model_dir)
    linear_cmp, expert_cmp = _compare(reloaded, fake_linear), _compare(reloaded, fake_experts)
    compared = {**linear_cmp, **expert_cmp}
    return {
        "file": EXPORT_DIR,
        "format": "nvfp4a16 (modelopt HF export)",
        "quantization_config": qcfg,
        "size_bytes": size,
        "parameters": params,
        "bits_per_weight": round(8 * size / params, 4),
        "calibration_texts": len(texts),
        "quantize_s": round(quant_s, 2),
        "export_s": round(export_s, 2),
        "reload": {
            "quantized_tensors": len(quantized),
            # the export holds the weights modelopt simulated (first and last layer), once q/k/v and
            # gate/up share the global scale the exporter gives them (`shared_global_scales`
            # quantizers of the model had theirs raised to their group's): element for element, but
            # for elements at a rounding tie, where GPU fake-quant and exporter may take either of
            # two equally near codes (`near_rounding_tie`)
            "fakequant_tensors_checked": len(compared),
            "fakequant_elements_checked": sum(c["elements"] for c in compared.values()),
            "fakequant_at_tie": sum(c["at_tie"] for c in compared.values()),
            "fakequant_mismatches": sum(c["mismatches"] for c in compared.values()),
            "fakequant_mismatches_off_tie": sum(c["mismatches_off_tie"] for c in compared.values()),
            "max_rel_diff_vs_fakequant_linear_weights": max((c["rel_diff"] for c in linear_cmp.values()), default=0.0),
            "max_rel_diff_vs_fakequant_expert_weights": max((c["rel_diff"] for c in expert_cmp.values()), default=0.0),
            # per tensor: which member of which layer a difference comes from, read from the manifest
            "fakequant_by_tensor": {k: {**c, "rel_diff": round(c["rel_diff"], 6)} for k, c in compared.items()},
            "shared_global_scales": shared,
            # the 4-bit rounding error against the 16-bit weights, and what it does to the logits
            "weight_rel_err": weight_err,
            "top1_agreement_vs_bf16": float((re_logits.argmax(-1) == ref_logits.argmax(-1))[mask].float().mean()),
            "rel_logit_err_vs_bf16": float((re_logits - ref_logits)[mask].norm() / ref_logits[mask].norm()),
        },
        "imatrix": None,
        "tensor_type_map": None,
    }


def _share_fused_global_scales(model) -> int:
    """Run the exporter's first step now: Linears that read the same input (q/k/v, gate/up, which
    vLLM fuses into one GEMM with one per-tensor scale) get their group's largest weight amax, i.e.
    one NVFP4 global scale. W4A16_NVFP4_CFG's dynamic block quantizers keep each Linear's own amax
    until then (modelopt 0.47 shares it at calibration only for its static NVFP4 quantizers), so a
    weight fake-quantized before this step gets other E4M3 block scales than the export writes and
    other E2M1 codes: 0.05-0.10 apart, the size of the 4-bit rounding. The export's own call finds
    the groups already shared and changes nothing. Returns how many quantizers' amax it raised."""
    import torch
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    def amaxes():
        return {n: m.weight_quantizer.amax.detach().clone() for n, m in model.named_modules()
                if _enabled(getattr(m, "weight_quantizer", None)) and m.weight_quantizer.amax is not None}

    before = amaxes()
    requantize_resmooth_fused_llm_layers(model)
    after = amaxes()
    return sum(not torch.equal(before[n], after[n]) for n in before)


def _enabled(quantizer) -> bool:
    return quantizer is not None and getattr(quantizer, "is_enabled", False)


# |x| / block scale at these values is where E2M1 rounding changes code (0.5 | 1.0 | 1.5 ...)
E2M1_BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def near_rounding_tie(weight: torch.Tensor, amax: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Which elements of `weight` get an NVFP4 code that hangs on the rounding of one float32 division,
    with the scales the exporter computes (global: amax / (6·448); per 16 elements: block max / 6 in
    its units, cast to E4M3): those whose |x| / block scale lies within `rtol` of an E2M1 decision
    boundary, and every element of a block whose unrounded scale lies within `rtol` of the midpoint
    between two E4M3 values. The exporter divides exactly (IEEE); modelopt's GPU fake-quant kernels do
    not (Triton's fast division, the CUDA extension's own arithmetic), so at such a tie the two may
    take either neighbour, the same distance away. bf16 weights meet ties far more often than chance
    (a few elements in 1,000 on random ones): a bf16 value over a block scale is often an exact
    ratio, which the global scale's float32 rounding moves by a few parts in 10^8."""
    import torch

    def e4m3(v):  # the cast saturates first, as the kernels do (torch's cast would give NaN past 448)
        return torch.clamp(v, max=448.0).to(torch.float8_e4m3fn).double()

    # a value is at a tie when nudging it down and up by `rtol` rounds it to two different values
    down, up = 1.0 - rtol, 1.0 + rtol
    # on the weight's device (a real model's experts are billions of elements), the mask back on the CPU
    x = weight.detach().float().reshape(-1, weight.shape[-1]).unflatten(-1, (-1, 16))
    gs = amax.detach().float().to(x.device).amax() / (6.0 * 448.0)
    unrounded = torch.clamp(x.abs().amax(-1, keepdim=True) / (6.0 * gs), max=448.0)
    scale_tie = e4m3(unrounded.double() * down) != e4m3(unrounded.double() * up)
    scale = unrounded.to(torch.float8_e4m3fn).float() * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale)).double()
    a, bounds = x.abs().double() / scale, torch.tensor(E2M1_BOUNDARIES, dtype=torch.float64, device=x.device)
    code_tie = torch.bucketize(a * down, bounds) != torch.bucketize(a * up, bounds)
    return (code_tie | scale_tie).reshape(weight.shape).cpu()


def _fakequant_weights(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What modelopt's quantizers make of the weights of the first and last decoder layer (CPU fp32),
    taken from the quantizers directly (transformers' grouped_mm expert kernels bypass the F.linear
    that modelopt patches, so a fake-quant forward would not show the experts' rounding): the Linear
    weights, and the fused experts' `gate_up_proj` / `down_proj` with each expert's own quantizer
    (the exporter splits gate_up into gate and up, both under the fused tensor's amax), keyed as the
    reloaded model names them. Call after `_share_fused_global_scales`."""
    import torch
    layers = sorted({int(m) for m in re.findall(r"layers\.(\d+)\.", " ".join(n for n, _ in model.named_modules()))})
    keep = {layers[0], layers[-1]} if layers else set()
    linear, experts = {}, {}
    with torch.no_grad():
        for name, m in model.named_modules():
            found = re.search(r"layers\.(\d+)\.", name + ".")
            if not found or int(found[1]) not in keep:
                continue
            wq = getattr(m, "weight_quantizer", None)
            if _enabled(wq) and isinstance(getattr(m, "weight", None), torch.Tensor):
                linear[f"{name}.weight"] = (wq(m.weight).float().cpu(), near_rounding_tie(m.weight, wq.amax))
            for proj in ("gate_up_proj", "down_proj"):
                qs, w = getattr(m, f"{proj}_weight_quantizers", None), getattr(m, proj, None)
                if isinstance(w, torch.Tensor) and w.dim() == 3 and qs is not None and all(_enabled(q) for q in qs):
                    experts[f"{name}.{proj}"] = (torch.stack([q(w[e]).float().cpu() for e, q in enumerate(qs)]),
                                                 torch.stack([near_rounding_tie(w[e], q.amax) for e, q in enumerate(qs)]))
    return linear, experts


def _compare(model, reference: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """Per tensor of `reference` ((fake-quant weight, rounding-tie mask) pairs): the reloaded weight's
    relative difference ||W_reloaded - W_fakequant|| / ||W_fakequant||, its elements, how many of them
    differ, and how many differ where the element is at no rounding tie (a real disagreement between
    export and simulation; at a tie both codes are equally right)."""
    state = model.state_dict()
    out = {}
    for k, (w, near) in sorted(reference.items()):
        got = state[k].float().cpu()
        differ = got != w
        out[k] = {"rel_diff": float((got - w).norm() / w.norm()), "elements": w.numel(),
                  "at_tie": int(near.sum()), "mismatches": int(differ.sum()),
                  "mismatches_off_tie": int((differ & ~near).sum())}
    return out


def _weight_errors(model_dir: Path, model, quantized: set[str]) -> dict:
    """||W_reloaded - W_16bit|| / ||W_16bit|| over the quantized tensors: 4-bit rounding error, ~0.1.
    One 16-bit tensor at a time, on the reloaded model's device (a full-size checkpoint is tens of GB)."""
    from safetensors import safe_open

    state = model.state_dict()
    errs = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in sorted(quantized & set(st.keys())):
                got = state[name].float()
                w = st.get_tensor(name).to(got.device).float()
                errs[name] = float((got - w).norm() / w.norm())
    if not errs:
        return {}
    worst = max(errs, key=errs.get)
    vals = sorted(errs.values())
    return {"median": vals[len(vals) // 2], "max": errs[worst], "worst_tensor": worst}


def reload(export_dir: Path, device: str | torch.device = "cpu"):
    """The exported checkpoint as a plain transformers model (bf16, eval mode, on `device`), NVFP4
    weights dequantized by modelopt; returns (model, names of the model's tensors that were stored
    in NVFP4). Unpacking and model construction happen on `device`: on CUDA a full-size export
    dequantizes in seconds, and the model's random initialisation (overwritten by the load) is not
    paid for on the CPU."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    export_dir, device = Path(export_dir), torch.device(device)
    if not list(export_dir.glob("*.safetensors")):
        raise MoePruneError(f"{export_dir} holds no *.safetensors: expected an NVFP4A16 export (quant_tier=nvfp4a16)")
    raw = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        raw.update(load_file(str(f), device=str(device)))
    state, experts, quantized = {}, {}, set()
    for name, t in raw.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        if t.dtype == torch.uint8 and name + "_scale" in raw:  # packed E2M1 pairs
            quantized.add(name)
            shape = (t.shape[0], t.shape[1] * 2)
            t = NVFP4QTensor(torch.Size(shape), torch.bfloat16, t).dequantize(
                dtype=torch.bfloat16, scale=raw[name + "_scale"], double_scale=raw[name + "_scale_2"],
                block_sizes={-1: 16})
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m["prefix"], {}).setdefault(int(m["e"]), {})[m["proj"]] = t
            if name in quantized:
                quantized.discard(name)
                quantized.add(f"{m['prefix']}.{'down_proj' if m['proj'] == 'down_proj' else 'gate_up_proj'}")
        else:
            state[name] = t
    # transformers' fused layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
    for prefix, per in experts.items():
        ids = sorted(per)
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in ids])
        state[f"{prefix}.down_proj"] = torch.stack([per[e]["down_proj"] for e in ids])
    del raw, experts
    config = AutoConfig.from_pretrained(export_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise MoePruneError(f"NVFP4 export {export_dir} does not rebuild the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if (export_dir / "generation_config.json").is_file():  # EOS ids etc. as the source model had them
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(export_dir)
    return model.eval(), quantized
