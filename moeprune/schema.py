"""The ground floor of every component's knobs: `Choice` (an enum-valued knob), `knob` (a default
with its range), `schema` (a component schema, registered where its class lives) and `register`.

A component owns its knobs: its schema is a dataclass beside its class (prune/strategies/,
evaluate/benches/, evaluate/backends/, moeprune/tracking.py, quant/), decorated with
`@schema(group, name)`; each preset names it in its `defaults:` (`- /schema/strategy/class_aggregate@_here_`).
`register` imports the packages below and stores every decorated schema in Hydra's ConfigStore, so a
new strategy, bench, backend, logger or tier kind is its own file and its preset, with no table to
edit. This module imports nothing of the domain (Hydra only inside `register`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import pkgutil
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

from moeprune.errors import MoePruneError

SCHEMA_GROUP = "schema"  # conf path of the schemas: schema/<group>/<name>
# Where the component schemas live: every module of these packages (or the module itself) is imported.
PACKAGES = ("moeprune.prune.strategies", "moeprune.evaluate.benches", "moeprune.evaluate.backends",
            "moeprune.tracking", "moeprune.quant")
DECLARES = "@schema.schema("  # how a module declares a schema (the walk below reads sources for it)
RANGE = "range"  # dataclass field metadata: (accepts, what is expected)
CHOICES = "choices"  # dataclass field metadata: () -> the values a registry holds now
T = TypeVar("T")

_SCHEMAS: dict[tuple[str, str], type] = {}  # (group, name) -> schema, filled by @schema as modules load


class Choice(str, Enum):
    """An enum-valued knob. Hydra refuses any other value at compose time; code compares, prints
    and hashes it as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__

    @classmethod
    def parse(cls, value: Any, knob: str, expected: Optional[str] = None):
        """`value` as a member: what a component built without Hydra (from Python) checks its enum
        knobs with; `knob` names it in the error (`strategy=max: strategy.score`)."""
        try:
            return cls(value)
        except ValueError:
            raise MoePruneError(f"{knob}={value!r}: expected {expected or cls.listed()}") from None

    @classmethod
    def listed(cls) -> str:
        return "one of " + ", ".join(m.value for m in cls)


def knob(default: Any, accepts: Callable[[Any], bool], expected: str) -> Any:
    """A field with its range, written once: `check` refuses a value `accepts` rejects (None passes
    wherever the type allows it; a non-finite float never does) with `<key>=<value>: expected <expected>`."""
    return dataclasses.field(default=default, metadata={RANGE: (accepts, expected)})


def choice(default: str, values: Callable[[], list[str]]) -> Any:
    """A str knob whose values are registered, not listed (a tier kind: one per kind module), so no
    Choice enum can hold them at import time; `invalid_choice` refuses another value as OmegaConf
    refuses an enum's."""
    return dataclasses.field(default=default, metadata={CHOICES: values})


def invalid_choice(node: Any, prefix: str) -> Optional[tuple[str, Any, str]]:
    """(key, value, why) for a `choice` knob of a config node typed by a schema that holds another
    value, `why` in OmegaConf's words for an enum (`Invalid value 'x', expected one of [a, b]`); else None."""
    from omegaconf import DictConfig, OmegaConf

    kind = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if not dataclasses.is_dataclass(kind):
        return None
    for f in dataclasses.fields(kind):
        values = f.metadata.get(CHOICES)
        if values and f.name in node and not OmegaConf.is_missing(node, f.name) and node[f.name] not in values():
            return (f"{prefix}.{f.name}", node[f.name],
                    f"Invalid value '{node[f.name]}', expected one of [{', '.join(values())}]")
    return None


def schema(group: str, name: str) -> Callable[[type[T]], type[T]]:
    """Register a component schema as `schema/<group>/<name>` (the path its presets name)."""

    def mark(cls: type[T]) -> type[T]:
        _SCHEMAS[(group, name)] = cls
        return cls

    return mark


def schemas() -> dict[tuple[str, str], type]:
    """Every component schema, after importing the modules that declare one. A module without
    `@schema.schema(` in its source is not imported: the hf backend's and NVFP4's pull in torch,
    which composing a config (every command, `--help` included) must not pay for."""
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        names = [package] if not spec.submodule_search_locations else [
            f"{package}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)]
        for name in names:
            origin = importlib.util.find_spec(name).origin
            if origin and DECLARES in Path(origin).read_text(encoding="utf-8"):
                importlib.import_module(name)
    return dict(_SCHEMAS)


def groups() -> set[str]:
    """The config groups whose presets each name a component schema."""
    return {group for group, _ in schemas()}


def register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for (group, name), node in schemas().items():
        cs.store(group=f"{SCHEMA_GROUP}/{group}", name=name, node=node)


def check(value: Any, prefix: str) -> None:
    """Every range of a typed value (a schema instance or a config node typed by one), nested
    schemas included; the key is named from `prefix` (`bench.n_per_class=-5: expected ...`)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        kind = OmegaConf.get_type(value)
        fields = {f.name: f for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {}
        # an interpolation is resolved only for a ranged knob: the rest (${hydra:...} paths) may not
        # resolve yet where the preflight runs, and holds no range
        items = [(k, value[k]) for k in value if not OmegaConf.is_missing(value, k)
                 and (not OmegaConf.is_interpolation(value, k) or RANGE in getattr(fields.get(k), "metadata", {}))]
    elif dataclasses.is_dataclass(value):
        fields = {f.name: f for f in dataclasses.fields(value)}
        items = [(k, getattr(value, k)) for k in fields]
    elif isinstance(value, Mapping):
        fields, items = {}, list(value.items())
    else:
        return
    for key, v in items:
        where = f"{prefix}.{key}"
        spec = fields[key].metadata.get(RANGE) if key in fields else None
        if spec and v is not None and not isinstance(v, bool) and isinstance(v, (int, float)):
            accepts, expected = spec
            if not accepts(v) or (isinstance(v, float) and not math.isfinite(v)):
                raise MoePruneError(f"{where}={v}: expected {expected}")
        check(v, where)


def make(kind: type[T], cfg: Optional[T], knobs: Mapping[str, Any], prefix: str) -> T:
    """A component's knobs: `cfg` (what config.build passes: the preset's schema instance) or the
    schema's defaults, with `knobs` (a Python caller's keywords) over them; ranges checked. A
    keyword the schema does not have is refused (TypeError: unexpected keyword argument)."""
    if cfg is not None and type(cfg) is not kind:  # a preset whose schema is another class's: knobs lost
        raise MoePruneError(f"{prefix}: its knobs are a {type(cfg).__name__}, but {prefix}'s class takes a "
                            f"{kind.__name__}: expected the preset to name the schema beside its _target_")
    value = kind(**knobs) if cfg is None else dataclasses.replace(cfg, **knobs) if knobs else cfg
    check(value, prefix)
    return value
