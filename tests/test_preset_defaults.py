"""Each knob's default is written once, on its schema: a component preset states only what differs
from it. (Recipe presets, conf/recipe, may restate defaults to document a published recipe.)"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from moeprune import schema
from moeprune.config import RunConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def _schema_of(group: str, raw: dict) -> type:
    """The preset's schema: the one its defaults list names, else the run schema's type for the group."""
    for entry in raw.get("defaults", []):
        if isinstance(entry, str) and entry.startswith(f"/{schema.SCHEMA_GROUP}/{group}/"):
            return schema.schemas()[(group, entry.split("/")[3].split("@")[0])]
    return typing.get_type_hints(RunConfig)[group]


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def restated(raw: dict, kind: type, prefix: str = "") -> list[str]:
    """The keys of `raw` whose value is the schema's default (nested schemas followed)."""
    out = []
    fields = {f.name: f for f in dataclasses.fields(kind)}
    hints = typing.get_type_hints(kind)
    for key, value in raw.items():
        if key not in fields:
            continue
        default = _default(fields[key])
        # a dict of schemas (calibration.tiers: name -> tier): each entry against the value schema
        if typing.get_origin(hints[key]) is dict and dataclasses.is_dataclass(typing.get_args(hints[key])[1]):
            for name, entry in (value or {}).items():
                out += restated(entry or {}, typing.get_args(hints[key])[1], f"{prefix}{key}.{name}.")
            continue
        # a nested schema, set or optional (Optional[X] is Union[X, None])
        nested = [t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)]
        if nested and isinstance(value, dict):
            out += restated(value, nested[0], f"{prefix}{key}.")
        elif default is not dataclasses.MISSING and type(value) is not bool and value == default:
            out.append(f"{prefix}{key}={value!r}")
        elif isinstance(default, bool) and value is default:
            out.append(f"{prefix}{key}={value!r}")
    return out


def component_presets() -> list[tuple[str, Path]]:
    hints = typing.get_type_hints(RunConfig)
    groups = schema.groups() | {g for g, t in hints.items() if dataclasses.is_dataclass(t) and (CONF / g).is_dir()}
    return [(g, p) for g in sorted(groups) for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, path", component_presets(), ids=lambda v: getattr(v, "stem", v))
def test_no_component_preset_restates_its_schemas_default(group, path):
    raw = yaml.safe_load(path.read_text()) or {}
    kind = _schema_of(group, raw)
    assert not restated(raw, kind), f"conf/{group}/{path.name} restates {kind.__name__}'s defaults"


def test_the_check_finds_a_restated_default():
    from moeprune.prune.strategies.base import ClassAggregateConfig

    from moeprune.quant.gguf_tier import GgufTierConfig

    assert restated({"alpha": 2.0, "score": "legacy", "breadth_bonus": 0.5, "protect_top": 1},
                    ClassAggregateConfig) == ["alpha=2.0", "score='legacy'"]
    assert restated({"imatrix": True, "cd": {"high_type": "q8_0", "high_fraction": 0.25}},
                    GgufTierConfig) == ["cd.high_fraction=0.25"]
    from moeprune.config import CalibrationConfig

    assert restated({"tiers": {"short": {"max_tokens": 64, "weight": 1.0}}}, CalibrationConfig) == ["tiers.short.weight=1.0"]
