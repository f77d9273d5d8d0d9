"""The reference tool's profile JSON (its `expert_neuron_*.json`), both ways.

Its layout, as its profiler writes it and its drop-map generator reads it:

    {"metadata": {"num_layers": L, "num_experts": E, "categories": [class, ...], ...},
     "categories": {class: {"<layer>": [{"id": e, "wnorm": .., "rnorm": .., "wsum": .., "tc": ..,
                                         "cc": .., ...}, ...E rows], ...}}}

A row may carry more (wnsq, rnsq, neuron_act): those are left out. `wnorm` and `tc` are required
(the reference's score reads only them); `rnorm`, `wsum` and `cc` come along when every row has
them. Classes keep the metadata's order (the reference's class-weight vector follows it), layers are
the keys as integers (the reference counts decoder layers from 0; every layer of its Gemma 4 is MoE).
The JSON does not record the routed experts per token: pass `top_k` (or let the metadata's `top_k`
give it) so that a drop map can be built from the profile without the model (docs/recipes.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.profile import Profile

REQUIRED = {"wnorm": "wnorm", "tc": "count"}  # the reference's names -> ours
OPTIONAL = {"rnorm": "rnorm", "wsum": "wsum", "cc": "hits"}


def to_reference(profile: Profile) -> dict:
    names = {**REQUIRED, **OPTIONAL}
    present = {ref: ours for ref, ours in names.items() if ours in profile.stats}

    def row(ci: int, li: int, e: int) -> dict:
        cell = {"id": e}
        for ref, ours in present.items():
            v = float(profile.stats[ours][ci, li, e])
            cell[ref] = int(v) if ref in ("tc", "cc") and v.is_integer() else v  # the reference writes counts as ints
        return cell

    meta = {"num_layers": len(profile.layers), "num_experts": profile.num_experts, "categories": profile.classes,
            "source": "moeprune"}
    if "top_k" in profile.meta:
        meta["top_k"] = profile.meta["top_k"]
    return {"metadata": meta,
            "categories": {c: {str(layer): [row(ci, li, e) for e in range(profile.num_experts)]
                               for li, layer in enumerate(profile.layers)}
                           for ci, c in enumerate(profile.classes)}}


def _bad(what: str) -> MoePruneError:
    return MoePruneError(f"reference profile: {what}")


def _number(cell: dict, key: str, where: str) -> float:
    value = cell[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{where}: {key}={value!r}: expected a number")
    return float(value)


def _classes(data) -> tuple[list[str], dict]:
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict) or not data["categories"]:
        raise _bad('expected {"metadata": {...}, "categories": {class: {"<layer>": [{"id", "wnorm", "tc", ...}]}}} '
                   "as the reference's profiler writes it")
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _bad(f"metadata is a {type(meta).__name__}: expected an object")
    classes = list(meta.get("categories") or data["categories"])
    if sorted(classes) != sorted(data["categories"]):
        raise _bad(f"metadata.categories {classes} differ from the classes present {sorted(data['categories'])}")
    return classes, meta


def from_reference(data, top_k: int | None = None) -> Profile:
    classes, meta = _classes(data)
    per_class = [data["categories"][c] for c in classes]
    for c, rows in zip(classes, per_class):
        if not isinstance(rows, dict) or not rows:
            raise _bad(f"class {c!r}: expected an object {{layer: [rows]}}")
    layer_keys = sorted(per_class[0], key=lambda k: _int(k, f"class {classes[0]!r}: layer key"))
    layers = [int(k) for k in layer_keys]
    for c, rows in zip(classes, per_class):
        if sorted(map(str, rows)) != sorted(layer_keys):
            raise _bad(f"class {c!r} has layers {sorted(rows)}, class {classes[0]!r} has {layer_keys}: expected the same")
    E = int(meta.get("num_experts") or len(per_class[0][layer_keys[0]]))
    if meta.get("num_layers") is not None and int(meta["num_layers"]) != len(layers):
        raise _bad(f"metadata.num_layers={meta['num_layers']}, but the classes have {len(layers)} layers {layers}")
    names = {**REQUIRED, **OPTIONAL}
    out = {ref: torch.zeros(len(classes), len(layers), E, dtype=torch.float64) for ref in names}
    seen = dict.fromkeys(names, True)
    for ci, (c, rows) in enumerate(zip(classes, per_class)):
        for li, key in enumerate(layer_keys):
            row = rows[key]
            where = f"{c}/{key}"
            if not isinstance(row, list) or not all(isinstance(cell, dict) for cell in row):
                raise _bad(f"{where}: expected a list of expert rows {{'id', 'wnorm', 'tc', ...}}")
            ids = [cell.get("id") for cell in row]
            if not all(type(i) is int for i in ids) or sorted(ids) != list(range(E)):
                raise _bad(f"{where}: expert ids {ids[:6]}...: expected each of 0..{E - 1} once")
            for cell in row:
                missing = sorted(set(REQUIRED) - set(cell))
                if missing:
                    raise _bad(f"{where}/{cell['id']}: missing {missing}")
                for ref in names:
                    if ref in cell:
                        out[ref][ci, li, cell["id"]] = _number(cell, ref, f"{where}/{cell['id']}")
                    else:
                        seen[ref] = False
    stats = {names[ref]: t for ref, t in out.items() if seen[ref]}
    top_k = top_k if top_k is not None else meta.get("top_k")
    extra = {"source": "reference-json", **({"top_k": int(top_k)} if top_k is not None else {})}
    # the JSON records no token totals (count sums top_k slots per token)
    return Profile(classes, layers, E, stats, dict.fromkeys(classes, 0), extra)


def _int(key, what: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise _bad(f"{what} {key!r}: expected an integer id") from None


def export_reference(profile_dir: Path, json_path: Path) -> None:
    from moeprune.artifacts import write_json

    write_json(Path(json_path), to_reference(Profile.load(profile_dir)))


def import_reference(json_path: Path, profile_dir: Path, top_k: int | None = None) -> Profile:
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as e:
        raise MoePruneError(f"{json_path}: not a readable JSON file ({e})") from None
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise MoePruneError(f"--top-k {top_k}: expected an integer >= 1 (the model's routed experts per token)")
    profile = from_reference(data, top_k)
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    profile.save(profile_dir)
    return profile
