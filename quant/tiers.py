"""Quant tiers: refusing tiers llama.cpp / modelopt cannot produce.

A tier is data (conf/quant_tier/<name>.yaml, read through Hydra by moeprune.presets.quant_tier)
typed by its kind's schema: `QuantTierConfig` here (kind none), `GgufTierConfig` in gguf_tier.py
(the llama-quantize type, imatrix on/off, per-tensor overrides and, for CD tiers, the
ContribDynamic rule), `Nvfp4TierConfig` in nvfp4.py. A knob of another kind is refused. Validation happens before any tool runs so a typo
costs nothing.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from omegaconf import MISSING, DictConfig, OmegaConf

from moeprune import schema
from moeprune.errors import MoePruneError
from moeprune.schema import Choice


class QuantKind(Choice):
    none = "none"
    gguf = "gguf"  # llama.cpp
    nvfp4 = "nvfp4"  # nvidia-modelopt, GPU


@schema.schema("quant_tier", "none")
@dataclass
class QuantTierConfig:
    """Every tier; `none` (no quantization) has no other knob. Each kind's schema adds its own
    and sets `kind` as its default."""

    name: str = MISSING
    kind: QuantKind = QuantKind.none

    @classmethod
    def no_knob(cls) -> str:
        """Why a knob this kind lacks is refused (here and when the config composes)."""
        knobs = [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "kind")]
        return f"a {cls.kind} tier has no such knob; its knobs: {', '.join(knobs) or 'none'}"


def kinds() -> dict[str, type[QuantTierConfig]]:
    """kind -> its schema, from the registered tier schemas."""
    return {str(s.kind): s for (group, _), s in schema.schemas().items() if group == "quant_tier"}


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


def _foreign_knobs(tier: DictConfig, own: type[QuantTierConfig], every: dict[str, type]) -> list[str]:
    """The keys of `tier` its kind's schema lacks, in the order their own kind's schema lists them."""
    fields = {f.name for f in dataclasses.fields(own)}
    order = dict.fromkeys([*(f.name for s in every.values() for f in dataclasses.fields(s)), *tier])
    return [k for k in order if k in tier and k not in fields]


def validate(tier: DictConfig) -> None:
    """Refuse a tier that cannot be produced, naming the key and what was expected."""
    where = f"quant_tier {tier.name!r}"
    every = kinds()
    if str(tier.kind) not in every:
        raise MoePruneError(f"{where}: kind={tier.kind!r}; expected one of {tuple(every)}")
    own = every[str(tier.kind)]
    foreign = _foreign_knobs(tier, own, every)
    if foreign:
        raise MoePruneError(f"{where}: {', '.join(f'quant_tier.{k}={tier.get(k)}' for k in foreign)} is set, but "
                            f"{own.no_knob()}")
    schema.check(tier, "quant_tier")  # each knob's range, on its kind's schema
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
