"""The gguf tier kind: its knobs and checks (GgufTierConfig, with the hooks the stages call) and one
GGUF tier produced: F16 base -> (imatrix) -> (CD tensor-type map) -> llama-quantize -> manifest.

The F16 conversion and the importance matrix depend only on the checkpoint (and the calibration
text), not on the tier, so they are kept in a small content-addressed cache (`base_cache`) and shared
by every tier of one pruned checkpoint: a ladder converts once and computes one imatrix.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from omegaconf import MISSING, OmegaConf

from moeprune import artifacts, schema
from moeprune.checkpoint import parameter_count
from moeprune.errors import MoePruneError
from moeprune.quant import contrib_dynamic, gguf_tools, imatrix, tiers, toolchain
from moeprune.quant.tiers import QuantTierConfig, Scoring, kind_knob

# llama-quantize's type names (QUANT_OPTIONS in tools/quantize/quantize.cpp of the built version).
FTYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S",
    "Q4_K", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q3_K", "IQ3_M", "IQ3_S",
    "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
    "TQ1_0", "TQ2_0", "MXFP4_MOE",
)
# ggml tensor type names accepted by --tensor-type / --token-embedding-type (ggml_type_name).
GGML_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_0", "q5_1", "q4_k", "q4_0", "q4_1", "iq4_nl",
    "iq4_xs", "q3_k", "iq3_s", "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s", "mxfp4",
)
FLOAT_FTYPES = ("F32", "F16", "BF16")


def is_iq(ftype: str) -> bool:
    return ftype.upper().startswith("IQ")


@dataclass
class ContribDynamicConfig:
    """A CD tier: each MoE layer's expert tensors get a type by the layer's contribution rank
    (the rule is in docs/quantization.md and quant/contrib_dynamic.py)."""

    high_type: str = MISSING  # experts of the top `high_fraction` of MoE layers by contribution
    mid_type: str = MISSING  # experts of the layers in between
    low_type: str = MISSING  # experts of the bottom `low_fraction`
    high_fraction: float = schema.knob(0.25, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
    low_fraction: float = schema.knob(0.5, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")


@schema.schema("quant_tier", "gguf")
@dataclass
class GgufTierConfig(QuantTierConfig):
    """A llama.cpp tier (tiers.validate refuses what llama-quantize cannot produce)."""

    kind: str = kind_knob("gguf")
    type: Optional[str] = None  # the llama-quantize type (F16, Q8_0, Q4_K_M, IQ4_XS, ...)
    imatrix: bool = False  # quantize with an importance matrix from the calibration corpus
    token_embedding_type: Optional[str] = None  # e.g. q8_0 for the "_L" tiers
    output_tensor_type: Optional[str] = None
    tensor_types: Dict[str, str] = field(default_factory=dict)  # regex over GGUF tensor names -> ggml type
    cd: Optional[ContribDynamicConfig] = None  # ContribDynamic per-layer expert types
    # llama-imatrix context (tokens per chunk)
    imatrix_ctx: int = schema.knob(128, lambda v: v >= 8, "at least 8 tokens")
    threads: int = schema.knob(0, lambda v: v >= 0, "at least 0 (0: every core)")  # llama.cpp threads

    @classmethod
    def check_knobs(cls, tier, where: str) -> None:
        _check(tier, where)

    @classmethod
    def preflight(cls, tier) -> None:
        """The llama.cpp sources the tools would be built from, when they are not built yet."""
        if toolchain.cached() is None and os.environ.get(toolchain.SDIST_ENV):
            sdist = toolchain.fetch_sdist(toolchain.home() / "sdist")
            toolchain.check_sdist(sdist, f"{toolchain.SDIST_ENV}={sdist}")

    @classmethod
    def quantize(cls, tier, job) -> dict:
        """Base GGUFs are kept under the cache dir; the corpus and profile are read only when the
        tier uses them (imatrix, CD)."""
        return produce(tier, job.model_dir, job.out_dir, job.cache_dir / "gguf_base",
                       corpus=job.corpus() if tier.imatrix else None,
                       profile=job.profile() if tier.cd is not None else None,
                       keep=job.keep, model_name=job.model_name)

    @classmethod
    def scoring(cls, quant_dir: Path, manifest: dict, device: str) -> Scoring:
        """Through llama.cpp, pointed at the quant's file (not the archived imatrix.gguf beside it)."""
        if not str(manifest.get("file", "")).endswith(".gguf"):
            raise MoePruneError(f"evaluate_quant runs GGUF files; {quant_dir} holds {manifest.get('file')!r}")
        return Scoring("llama_cpp", Path(quant_dir), knobs={"gguf": str(Path(quant_dir) / manifest["file"])})


def _check(tier, where: str) -> None:
    """What llama-quantize cannot produce (or would badly), named."""
    if not tier.type or tier.type.upper() not in FTYPES:
        raise MoePruneError(f"{where}: type={tier.type!r} is not a llama-quantize type; expected one of {FTYPES}")
    ftype = tier.type.upper()
    if ftype in FLOAT_FTYPES and tier.imatrix:
        raise MoePruneError(f"{where}: an importance matrix does nothing for {ftype}; expected imatrix=false")
    # llama.cpp refuses (IQ1/IQ2) or badly degrades (IQ3/IQ4) the IQ types without an imatrix.
    if is_iq(ftype) and not tier.imatrix:
        raise MoePruneError(f"{where}: {ftype} needs an importance matrix; expected imatrix=true")
    named = {"token_embedding_type": tier.token_embedding_type, "output_tensor_type": tier.output_tensor_type,
             **{f"tensor_types[{k!r}]": v for k, v in tier.tensor_types.items()}}
    if tier.cd is not None:
        named.update({f"cd.{k}": tier.cd[k] for k in ("high_type", "mid_type", "low_type")})
        hi, lo = tier.cd.high_fraction, tier.cd.low_fraction
        if hi + lo > 1:  # each in [0, 1]: the schema's range
            raise MoePruneError(f"{where}: cd.high_fraction={hi}, cd.low_fraction={lo}; "
                                "expected fractions whose sum is at most 1")
        if ftype in FLOAT_FTYPES:
            raise MoePruneError(f"{where}: a CD tier needs a quantized base type; got {ftype}")
    for key, value in named.items():
        if value is not None and value.lower() not in GGML_TYPES:
            raise MoePruneError(f"{where}: {key}={value!r} is not a ggml type; expected one of {GGML_TYPES}")
        if value is not None and is_iq(value) and not tier.imatrix:
            raise MoePruneError(f"{where}: {key}={value} is an IQ type, which needs an importance matrix; "
                                "expected imatrix=true")
    if tier.tensor_types and ftype in FLOAT_FTYPES:
        raise MoePruneError(f"{where}: tensor_types override quantized types; {ftype} is not quantized "
                            "(expected a quantized base type)")
    for pattern in tier.tensor_types:
        try:
            re.compile(pattern)
        except re.error as e:
            raise MoePruneError(f"{where}: tensor_types pattern {pattern!r} is not a regular expression ({e})") from None


MANIFEST = "quant-manifest.json"
TENSOR_TYPE_FILE = "tensor-types.txt"


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

