"""Architecture adapters: one file per MoE family, one registry.

`adapter_for(config_dict)` picks the adapter from the checkpoint's `model_type`.
"""

from __future__ import annotations

import importlib
import pkgutil

from moeprune.errors import MoePruneError
from moeprune.registry import Registry

ADAPTERS: Registry = Registry("architecture adapter")


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def adapter_for(config_dict: dict):
    _load_all()
    model_type = config_dict.get("model_type")
    for _, adapter in ADAPTERS.items():
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for _, a in ADAPTERS.items() for t in a.model_types)
    raise MoePruneError(
        f"unsupported architecture model_type={model_type!r}; supported model types: {', '.join(supported)}"
    )


def get_adapter(name: str):
    _load_all()
    return ADAPTERS.get(name)
