"""Produce one GGUF tier: F16 base -> (imatrix) -> (CD tensor-type map) -> llama-quantize -> manifest.

The F16 conversion and the importance matrix depend only on the checkpoint (and the calibration
text), not on the tier, so they are kept in a small content-addressed cache (`base_cache`) and shared
by every tier of one pruned checkpoint: a ladder converts once and computes one imatrix.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from omegaconf import MISSING, OmegaConf
from safetensors import safe_open

from moeprune import artifacts, schema
from moeprune.errors import MoePruneError
from moeprune.quant import contrib_dynamic, gguf_tools, imatrix, tiers, toolchain
from moeprune.quant.tiers import QuantKind, QuantTierConfig


@dataclass
class ContribDynamicConfig:
    """A CD tier: each MoE layer's expert tensors get a type by the layer's contribution rank
    (the rule is in docs/quantization.md and quant/contrib_dynamic.py)."""

    high_type: str = MISSING  # experts of the top `high_fraction` of MoE layers by contribution
    mid_type: str = MISSING  # experts of the layers in between
    low_type: str = MISSING  # experts of the bottom `low_fraction`
    high_fraction: float = 0.25
    low_fraction: float = 0.5


@schema.schema("quant_tier", "gguf")
@dataclass
class GgufTierConfig(QuantTierConfig):
    """A llama.cpp tier (tiers.validate refuses what llama-quantize cannot produce)."""

    kind: QuantKind = QuantKind.gguf
    type: Optional[str] = None  # the llama-quantize type (F16, Q8_0, Q4_K_M, IQ4_XS, ...)
    imatrix: bool = False  # quantize with an importance matrix from the calibration corpus
    token_embedding_type: Optional[str] = None  # e.g. q8_0 for the "_L" tiers
    output_tensor_type: Optional[str] = None
    tensor_types: Dict[str, str] = field(default_factory=dict)  # regex over GGUF tensor names -> ggml type
    cd: Optional[ContribDynamicConfig] = None  # ContribDynamic per-layer expert types
    # llama-imatrix context (tokens per chunk)
    imatrix_ctx: int = schema.knob(128, lambda v: v >= 8, "at least 8 tokens")
    threads: int = 0  # llama.cpp threads; 0 = every core

MANIFEST = "quant-manifest.json"
TENSOR_TYPE_FILE = "tensor-types.txt"


def parameter_count(model_dir: Path) -> int:
    """Parameters of the HF checkpoint (read from the safetensors headers, no weights loaded)."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise MoePruneError(f"{model_dir} has no *.safetensors files: expected a Hugging Face checkpoint")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def _cached(base_cache: Path | None, key_parts: dict, name: str, build) -> Path:
    """`name` inside base_cache/<hash of key_parts>/, built by build(path) once (atomic dir)."""
    final = Path(base_cache) / artifacts.hash_json(key_parts)[:20]
    if not (final / name).is_file():
        with artifacts.atomic_dir(final) as tmp:
            build(tmp / name)
            artifacts.write_json(tmp / "key.json", key_parts)
    return final / name


def produce(tier, model_dir: Path, out_dir: Path, base_cache: Path, *, corpus: dict[str, list[str]] | None = None,
            profile=None, keep: dict[int, list[int]] | None = None, model_name: str | None = None) -> dict:
    """Write <model_name>-<TYPE>.gguf (+ imatrix, tensor-type file, manifest) into out_dir."""
    tiers.validate(tier)
    gguf_tools.check_model_dir(model_dir)
    tc = toolchain.ensure()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_name = model_name or Path(model_dir).name
    ftype = tier.type.upper()
    threads = tier.threads or os.cpu_count() or 1
    model_key = {"model": artifacts.hash_path(model_dir), "toolchain": toolchain.build_id()}

    f16 = _cached(base_cache, {**model_key, "outtype": "f16", "name": model_name}, "model-F16.gguf",
                  lambda p: gguf_tools.convert(tc, model_dir, p, model_name=model_name))
    manifest: dict = {"tier": OmegaConf.to_container(tier, resolve=True), "type": ftype, "toolchain": toolchain.build_id(),
                      "source": str(model_dir)}

    imatrix_path = None
    if tier.imatrix:
        if not corpus:
            raise MoePruneError(f"quant_tier {tier.name!r} uses an imatrix: expected a calibration corpus")
        text = imatrix.calibration_text(corpus)
        (out_dir / imatrix.TEXT_FILE).write_text(text)
        cached = _cached(base_cache, {**model_key, "text": artifacts.hash_bytes(text.encode()), "ctx": tier.imatrix_ctx},
                         imatrix.IMATRIX_FILE,
                         lambda p: imatrix.compute(tc, f16, out_dir / imatrix.TEXT_FILE, p, tier.imatrix_ctx, threads))
        imatrix_path = out_dir / imatrix.IMATRIX_FILE
        shutil.copyfile(cached, imatrix_path)  # archived next to the quant
        manifest["imatrix"] = {"file": imatrix.IMATRIX_FILE, "sha256": artifacts.hash_file(imatrix_path, True),
                               "text": imatrix.TEXT_FILE, "text_sha256": artifacts.hash_file(out_dir / imatrix.TEXT_FILE, True),
                               "text_lines": text.count("\n"), "ctx": tier.imatrix_ctx}
    else:
        manifest["imatrix"] = None

    # llama-quantize applies the first pattern a tensor name matches: one-off overrides
    # (`tensor_types`) go before the CD rule so they win over it
    lines = [f"{pattern}={typ.lower()}" for pattern, typ in tier.tensor_types.items()]
    manifest["tensor_type_map"] = None
    if tier.cd is not None:
        if profile is None:
            raise MoePruneError(f"quant_tier {tier.name!r} is a CD tier: expected a profile to rank layers by contribution")
        contribution = contrib_dynamic.layer_contribution(profile, keep or {})
        layer_types = contrib_dynamic.assign_types(contribution, tier.cd)
        lines += contrib_dynamic.tensor_type_lines(layer_types)
        manifest["tensor_type_map"] = {"layer_contribution": {str(k): v for k, v in contribution.items()},
                                       "layer_types": {str(k): v for k, v in layer_types.items()}}
    type_file = None
    if lines:
        type_file = out_dir / TENSOR_TYPE_FILE
        type_file.write_text("\n".join(lines) + "\n")
        manifest["tensor_type_map"] = {"file": TENSOR_TYPE_FILE, "lines": lines, **(manifest["tensor_type_map"] or {})}

    out = out_dir / f"{model_name}-{ftype}.gguf"
    if ftype == "F16":  # the base itself; other float types go through llama-quantize
        shutil.copyfile(f16, out)
        fallbacks, log = {}, ""
    else:
        result = gguf_tools.quantize(tc, f16, out, ftype, imatrix=imatrix_path, tensor_type_file=type_file,
                                     token_embedding_type=tier.token_embedding_type,
                                     output_tensor_type=tier.output_tensor_type, threads=threads)
        fallbacks, log = result["fallbacks"], result["log"]
        (out_dir / "llama-quantize.log").write_text(log)

    tensors = gguf_tools.inspect(tc, out)
    params = parameter_count(model_dir)
    size = out.stat().st_size
    by_type: dict[str, int] = {}
    for t in tensors.values():
        by_type[t["type"]] = by_type.get(t["type"], 0) + 1
    manifest.update({
        "file": out.name,
        "sha256": artifacts.hash_file(out, True),
        "size_bytes": size,
        "f16_size_bytes": f16.stat().st_size,
        "parameters": params,
        "gguf_elements": sum(t["elements"] for t in tensors.values()),
        "bits_per_weight": round(8 * size / params, 4),
        "tensor_types": {name: t["type"] for name, t in tensors.items()},
        "tensor_type_counts": dict(sorted(by_type.items())),
        "fallbacks": fallbacks,
    })
    artifacts.write_json(out_dir / MANIFEST, manifest)
    return manifest

