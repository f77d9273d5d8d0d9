"""A drop map: {MoE layer: the dropped expert ids}, checked once when it is built or read.

`DropMap.parse` is the one validator: JSON keys become layer ints here and nowhere else, ids are
distinct and in range, every layer keeps at least top_k experts, the map covers exactly the
model's MoE layers (when they are known), a physical map keeps one count in every layer (a
checkpoint config has one expert count), and the architecture's own routing rules hold (the
adapter's `check_routing_rules`, e.g. DeepSeek-V3's expert groups). Surgery, virtual pruning and
the reports take a DropMap and trust it. The JSON form is the reference tools' `{"<layer>": [ids]}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from moeprune.errors import MoePruneError

# (the map as {layer: sorted ids}, physical) -> None or MoePruneError: an architecture's own rules
RoutingRules = Callable[[dict[int, list[int]], bool], None]


@dataclass(frozen=True, eq=False)  # Mapping's equality: the same layers dropping the same ids
class DropMap(Mapping):
    """Read like {layer: [dropped ids]} (ascending layers); `as_json()` gives the file's form."""

    dropped: Mapping[int, tuple[int, ...]]  # MoE layer -> sorted dropped expert ids
    num_experts: int
    physical: bool  # checked for a checkpoint: one kept count everywhere, the architecture's physical rules

    @classmethod
    def parse(cls, obj, *, num_experts: int, top_k: int, layers: list[int] | None = None, physical: bool = False,
              rules: RoutingRules | None = None) -> DropMap:
        """Check `obj` ({layer: [ids]}, keys str or int) against a model with `num_experts` experts
        routed top_k, whose MoE layers are `layers` (None: not known here, any layer index)."""
        if not isinstance(obj, Mapping):
            raise MoePruneError(f"drop map must be a JSON object {{layer: [expert ids]}}, got {type(obj).__name__}")
        out: dict[int, list[int]] = {}
        for key, ids in obj.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise MoePruneError(f"drop map key {key!r} is not a layer index") from None
            if layers is not None and layer not in layers:
                raise MoePruneError(f"drop map names layer {layer}, but the model's MoE layers are {layers}")
            if layer in out:
                raise MoePruneError(f"drop map names layer {layer} twice")
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in ids):
                raise MoePruneError(f"drop map layer {layer}: expected a list of integer expert ids")
            if len(set(ids)) != len(ids):
                raise MoePruneError(f"drop map layer {layer}: duplicate expert ids "
                                    f"{sorted(i for i in set(ids) if ids.count(i) > 1)}")
            bad = [i for i in ids if not 0 <= i < num_experts]
            if bad:
                raise MoePruneError(f"drop map layer {layer}: expert ids {bad} out of range 0..{num_experts - 1}")
            if num_experts - len(ids) < top_k:
                raise MoePruneError(f"drop map layer {layer} keeps {num_experts - len(ids)} experts, fewer than "
                                    f"top_k={top_k}")
            out[layer] = sorted(ids)
        if layers is not None and sorted(out) != sorted(layers):
            raise MoePruneError(f"drop map covers {len(out)} layers {sorted(out)}, expected the model's {len(layers)} "
                                f"MoE layers {layers}")
        kept = {num_experts - len(v) for v in out.values()}
        if physical and len(kept) > 1:
            raise MoePruneError(f"drop map keeps different expert counts per layer {sorted(kept)}: a pruned "
                                f"checkpoint needs one count (budget maps are for virtual pruning)")
        if rules is not None:
            rules(out, physical)
        return cls({layer: tuple(ids) for layer, ids in sorted(out.items())}, num_experts, physical)

    @classmethod
    def for_model(cls, obj, adapter, config_dict: dict, *, physical: bool, layers: list[int] | None = None) -> DropMap:
        """parse() with the expert count, top_k and routing rules of the model whose config.json
        is `config_dict` (its family's `adapter`)."""
        return cls.parse(obj, num_experts=adapter.num_experts(config_dict), top_k=adapter.top_k(config_dict),
                         layers=layers, physical=physical,
                         rules=lambda m, phys: adapter.check_routing_rules(config_dict, m, phys))

    @classmethod
    def read(cls, path, parse: Callable[[object], DropMap]) -> DropMap:
        """A map file checked by `parse` (e.g. `lambda m: DropMap.for_model(m, adapter, config, physical=True)`);
        every error names the file."""
        obj = load_json(Path(path))
        try:
            return parse(obj)
        except MoePruneError as e:
            raise MoePruneError(f"{path}: {e}") from None

    # ---- reading it --------------------------------------------------------------------------
    def __getitem__(self, layer: int) -> list[int]:
        return list(self.dropped[layer])

    def __iter__(self) -> Iterator[int]:
        return iter(self.dropped)

    def __len__(self) -> int:
        return len(self.dropped)

    def kept(self) -> dict[int, list[int]]:
        return {layer: [e for e in range(self.num_experts) if e not in ids] for layer, ids in self.dropped.items()}

    def kept_counts(self) -> list[int]:
        """The distinct kept counts, ascending (one for a physical map; none for an empty map)."""
        return sorted({self.num_experts - len(ids) for ids in self.dropped.values()})

    def as_json(self) -> dict[str, list[int]]:
        return {str(layer): list(ids) for layer, ids in self.dropped.items()}


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # json keeps the last silently: the map would not be the one its author wrote
        raise ValueError(f"duplicate keys {twice}")
    return dict(pairs)


def load_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise MoePruneError(f"drop map not found: {path}") from None
    except IsADirectoryError:
        raise MoePruneError(f"drop map {path} is a directory: expected a JSON file") from None
    except ValueError as e:
        raise MoePruneError(f"drop map {path} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class VirtualPrune:
    """Virtual pruning as one value, what the hf backend takes: route around `drop_map`'s dropped
    experts inside the loaded model, and scale its shared FFN by `shared_ffn_alpha` as surgery
    would (both undone after each generate). The default prunes nothing."""

    drop_map: Mapping | None = None  # a DropMap (or its {layer: [dropped ids]})
    shared_ffn_alpha: float = 1.0
