"""Quant tier kinds: each kind's schema is its own module's hooks, and the stages call them by kind.

A tier is data (conf/quant_tier/<name>.yaml, read through Hydra by moeprune.presets.quant_tier)
typed by its kind's schema: `QuantTierConfig` here (kind none), `GgufTierConfig` in gguf_tier.py
(the llama-quantize type, imatrix on/off, per-tensor overrides and, for CD tiers, the
ContribDynamic rule), `Nvfp4TierConfig` in nvfp4.py. A knob of another kind is refused. Validation
happens before any tool runs so a typo costs nothing.

A new kind is one module under quant/ declaring its schema (`@schema.schema("quant_tier", <kind>)`,
subclassing QuantTierConfig, `kind: str = kind_knob(<kind>)`) with the hooks below overridden, plus
its presets: `kinds()` finds it, the quant stage, its preflight and evaluate_quant call its hooks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig

from moeprune import schema
from moeprune.errors import MoePruneError


def kind_knob(kind: str) -> Any:
    """The `kind` field of a tier schema: a str whose values are the registered kinds, refused when
    the config composes as an enum would be (`schema.choice`): a kind comes from its own module,
    so no enum in this file lists them."""
    return schema.choice(kind, lambda: list(kinds()))


@dataclass(frozen=True)
class Scoring:
    """How evaluate_quant scores a quant: `backend`, the backend preset that serves it (the run's
    backend node when it is that one), with `knobs` set on it; `path`, what it scores; `dtype`, the
    model dtype a reload needs (None: the backend's own); `runtime`, extra backend arguments (a
    loaded model)."""

    backend: str
    path: Path
    dtype: Optional[str] = None
    knobs: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)


@schema.schema("quant_tier", "none")
@dataclass
class QuantTierConfig:
    """Every tier; `none` (no quantization) has no other knob. Each kind's schema adds its own knobs,
    sets `kind` as its default and overrides the hooks (classmethods: the stages are handed the tier
    as a config node, and look its kind's schema up with `kind_of`)."""

    name: str = MISSING
    kind: str = kind_knob("none")

    # evaluate_quant's hook: (quant_dir, its manifest, model.device) -> Scoring; None: no
    # evaluate_quant for this kind (a plain attribute, so not a knob)
    scoring = None

    @classmethod
    def no_knob(cls) -> str:
        """Why a knob this kind lacks is refused (here and when the config composes)."""
        knobs = [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "kind")]
        return f"a {cls.kind} tier has no such knob; its knobs: {', '.join(knobs) or 'none'}"

    @classmethod
    def check_knobs(cls, tier: DictConfig, where: str) -> None:
        """Refuse, naming the knob, what this kind's tool cannot produce (after the ranges are checked)."""

    @classmethod
    def preflight(cls, tier: DictConfig) -> None:
        """The run's cheap checks before any stage (a tool or device the kind needs)."""

    @classmethod
    def quantize(cls, tier: DictConfig, job) -> dict:
        """The quant of `job` (a moeprune.quant.stage.QuantJob) in job.out_dir; returns its manifest,
        holding at least `file`, `size_bytes`, `parameters`, `bits_per_weight` and `tier` (the tier as a
        dict): the release card reads them."""
        raise MoePruneError(f"quant_tier {tier.name!r} has kind {tier.kind!r}: nothing to quantize")


def kinds() -> dict[str, type[QuantTierConfig]]:
    """kind -> its schema, from the registered tier schemas: `none` first, then by name (the order
    the kinds are listed in messages, whichever module was imported first)."""
    found = {str(s.kind): s for (group, _), s in schema.schemas().items() if group == "quant_tier"}
    return dict(sorted(found.items(), key=lambda kv: (kv[1] is not QuantTierConfig, kv[0])))


def kind_of(kind: Any, where: str) -> type[QuantTierConfig]:
    """The schema of `kind`; an unknown one is refused naming `where` it was read."""
    every = kinds()
    if str(kind) not in every:
        raise MoePruneError(f"{where}: kind={kind!r}; expected one of {tuple(every)}")
    return every[str(kind)]


def _foreign_knobs(tier: DictConfig, own: type[QuantTierConfig], every: dict[str, type]) -> list[str]:
    """The keys of `tier` its kind's schema lacks, in the order their own kind's schema lists them."""
    fields = {f.name for f in dataclasses.fields(own)}
    order = dict.fromkeys([*(f.name for s in every.values() for f in dataclasses.fields(s)), *tier])
    return [k for k in order if k in tier and k not in fields]


def validate(tier: DictConfig) -> None:
    """Refuse a tier that cannot be produced, naming the key and what was expected."""
    where = f"quant_tier {tier.name!r}"
    own = kind_of(tier.kind, where)
    foreign = _foreign_knobs(tier, own, kinds())
    if foreign:
        raise MoePruneError(f"{where}: {', '.join(f'quant_tier.{k}={tier.get(k)}' for k in foreign)} is set, but "
                            f"{own.no_knob()}")
    schema.check(tier, "quant_tier")  # each knob's range, on its kind's schema
    own.check_knobs(tier, where)
