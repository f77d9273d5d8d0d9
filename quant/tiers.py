"""Quant tiers: loading a preset by name and refusing tiers llama.cpp / modelopt cannot produce.

A tier is data (conf/quant_tier/<name>.yaml, schema `QuantTierConfig`, read through Hydra): a kind (gguf | nvfp4), the
llama-quantize type, imatrix on/off, optional per-tensor overrides and, for CD tiers, the
ContribDynamic rule. Validation happens before any tool runs so a typo costs nothing.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig

from moeprune.config import preset, presets
from moeprune.errors import MoePruneError

KINDS = ("none", "gguf", "nvfp4")

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


def available() -> list[str]:
    return presets("quant_tier")


def load(name: str) -> DictConfig:
    """A preset by name, typed by the schema: what `quant_tier=<name>` composes to."""
    try:
        return preset("quant_tier", name)
    except MoePruneError:
        raise MoePruneError(f"unknown quant tier {name!r}; expected one of: {', '.join(available())}") from None


def is_iq(ftype: str) -> bool:
    return ftype.upper().startswith("IQ")


# The knobs each kind reads beyond name and kind; another kind's knob is refused, not ignored.
NVFP4_KNOBS = ("calib_samples",)
GGUF_KNOBS = ("type", "imatrix", "token_embedding_type", "output_tensor_type", "tensor_types", "cd", "imatrix_ctx",
              "threads")


def _foreign_knobs(tier: DictConfig) -> list[str]:
    """The knobs set away from the schema's defaults that the tier's kind does not read."""
    import dataclasses

    from moeprune.config import QuantTierConfig

    reads = {"gguf": GGUF_KNOBS, "nvfp4": NVFP4_KNOBS, "none": ()}[str(tier.kind)]
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(QuantTierConfig)}
    return [k for k in (*GGUF_KNOBS, *NVFP4_KNOBS) if k not in reads and tier.get(k) != defaults[k]]


def validate(tier: DictConfig) -> None:
    """Refuse a tier that cannot be produced, naming the key and what was expected."""
    where = f"quant_tier {tier.name!r}"
    if tier.kind not in KINDS:
        raise MoePruneError(f"{where}: kind={tier.kind!r}; expected one of {KINDS}")
    foreign = _foreign_knobs(tier)
    if foreign:
        reads = {"gguf": GGUF_KNOBS, "nvfp4": NVFP4_KNOBS, "none": ()}[str(tier.kind)]
        raise MoePruneError(f"{where}: {', '.join(f'quant_tier.{k}={tier.get(k)}' for k in foreign)} is set, but a "
                            f"{tier.kind} tier has no such knob; its knobs: {', '.join(reads) or 'none'}")
    if tier.kind != "gguf":
        return
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
        if not (0 <= hi <= 1 and 0 <= lo <= 1 and hi + lo <= 1):
            raise MoePruneError(f"{where}: cd.high_fraction={hi}, cd.low_fraction={lo}; "
                                "expected fractions in [0, 1] whose sum is at most 1")
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
    if tier.imatrix_ctx < 8:
        raise MoePruneError(f"{where}: imatrix_ctx={tier.imatrix_ctx}; expected at least 8 tokens")
