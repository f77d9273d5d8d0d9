"""Streaming expert surgery on a safetensors checkpoint.

Every tensor is planned from the shard headers alone (name, dtype, shape, byte range), then the
output shards are written tensor by tensor:
- expert-axis tensors (fused expert weights and biases, router rows and biases, per-expert scales)
  keep the kept experts' rows: byte ranges, copied by the kernel;
- one-tensor-per-expert weights (Hub layout: `experts.N.w1`, `experts.N.gate_proj`, ...) of kept
  experts are copied and renumbered 0..keep-1 in their original order;
- the shared FFN's down projection is scaled by α when asked (the one tensor computed in memory);
- everything else, vision towers included, is copied byte for byte.
Multi-token-prediction heads (DeepSeek-V3's `model.layers.61`, Qwen3.5/Next's `mtp.*`) are not part
of the model transformers runs and are not profiled. `mtp_heads="keep"` copies their experts
unpruned, with a warning and a note in the metadata (main-model use is unaffected; an engine that
loads them for speculative decoding would need them pruned by a map no profile provides).
`mtp_heads="drop"` leaves the whole head out and sets the config's head count to 0, which gives a
consistent checkpoint without speculative decoding.
Memory stays near one small tensor whatever the checkpoint size; the source is only read. The
output is built in a temp dir beside `out` and renamed into place only when complete.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from moeprune import artifacts
from moeprune.adapters import adapter_for
from moeprune.checkpoint import INDEX, SourceTensor, read_sources
from moeprune.dropmap import DropMap
from moeprune.errors import MoePruneError
from moeprune.models import read_config
from moeprune.prune.shards import OutTensor, plan_shards, write_shard

log = logging.getLogger("moeprune")

METADATA_FILE = "expert_drop_metadata.json"
SHARED_MARKER = ".shared_applied"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SCALABLE = {"F32", "F16", "BF16", "F64"}


def _check_paths(src: Path, out: Path) -> None:
    if out == src or src in out.parents:
        raise MoePruneError(f"output dir {out} is the source dir or inside it: expected a path outside {src}")
    if out in src.parents:
        raise MoePruneError(f"output dir {out} contains the source dir {src}: replacing it would delete the source")
    if not (src / "config.json").is_file():
        raise MoePruneError(f"{src}: no config.json: expected a Hugging Face checkpoint dir")


MTP_HEADS = ("keep", "drop")


def check_mtp_heads(value: str) -> None:
    if value not in MTP_HEADS:
        raise MoePruneError(f"prune.mtp_heads={value!r}: expected one of {list(MTP_HEADS)}")


@dataclass
class Plan:
    tensors: list[OutTensor] = field(default_factory=list)  # the output, in source order
    layers: set[int] = field(default_factory=set)  # MoE layers seen
    scaled: int = 0  # shared-FFN tensors scaled by alpha
    unpruned: list[str] = field(default_factory=list)  # MTP expert tensors copied as they are
    mtp_dropped: list[str] = field(default_factory=list)  # MTP tensors left out (mtp_heads="drop")


def _plan(adapter, sources: dict[str, SourceTensor], keep: dict[int, list[int]], num_experts: int,
          alpha: float, num_layers: int | None, mtp_heads: str = "keep") -> Plan:
    plan = Plan()
    per_expert_seen: dict[str, set[int]] = {}

    def in_head(name: str, role) -> bool:  # a multi-token-prediction head, outside the decoder stack
        return (num_layers is not None and role.layer is not None and role.layer >= num_layers
                or name.startswith(adapter.mtp_prefixes))

    # the head is copied as it is (or dropped): its shared FFN is not the model's to upweight
    fp8_scales = _fp8_scales(adapter, sources, in_head) if alpha != 1.0 else set()
    for t in sorted(sources.values(), key=lambda t: (str(t.file), t.start)):
        role = adapter.role(t.name)
        head = in_head(t.name, role)
        if mtp_heads == "drop" and head:
            plan.mtp_dropped.append(t.name)
        elif t.name in fp8_scales:  # W = codes x scale: scaling the scale upweights W exactly
            plan.tensors.append(OutTensor(t.name, t.dtype, t.shape, t.nbytes, compute=_scaled(t, alpha)))
            plan.scaled += 1
        elif head and (role.kind in ("expert_axis", "per_expert") or _expert_like(adapter, t.name)):
            plan.unpruned.append(t.name)
            plan.tensors.append(OutTensor(t.name, t.dtype, t.shape, t.nbytes, pieces=[(t.file, t.start, t.nbytes)]))
        elif role.kind == "expert_axis":
            if len(t.shape) <= role.axis or t.shape[role.axis] != num_experts:
                raise MoePruneError(f"{t.name}: shape {list(t.shape)}, expected {num_experts} experts on axis {role.axis}")
            plan.layers.add(role.layer)
            plan.tensors.append(_slice(t, role.axis, keep.get(role.layer, list(range(num_experts))), num_experts))
        elif role.kind == "per_expert":
            if role.expert >= num_experts:
                raise MoePruneError(f"{t.name}: expert id {role.expert}, expected ids below num_experts ({num_experts})")
            plan.layers.add(role.layer)
            per_expert_seen.setdefault(role.rename, set()).add(role.expert)
            ids = keep.get(role.layer, list(range(num_experts)))
            if role.expert in ids:
                plan.tensors.append(OutTensor(role.rename.format(expert=ids.index(role.expert)), t.dtype, t.shape,
                                              t.nbytes, pieces=[(t.file, t.start, t.nbytes)]))
        elif role.kind == "shared_down" and alpha != 1.0 and t.dtype in _SCALABLE and not head:
            plan.tensors.append(OutTensor(t.name, t.dtype, t.shape, t.nbytes, compute=_scaled(t, alpha)))
            plan.scaled += 1
        else:
            plan.tensors.append(OutTensor(t.name, t.dtype, t.shape, t.nbytes, pieces=[(t.file, t.start, t.nbytes)]))
    for template, ids in per_expert_seen.items():
        if ids != set(range(num_experts)):
            missing = sorted(set(range(num_experts)) - ids)
            raise MoePruneError(f"checkpoint lacks {template.format(expert='N')} for experts {missing}: "
                                f"expected one tensor per expert 0..{num_experts - 1}")
    return plan


def _fp8_scales(adapter, sources: dict[str, SourceTensor], in_head) -> set[str]:
    """The scale tensors of shared-FFN down projections stored in 8-bit float: DeepSeek-V3's block
    `weight_scale_inv` or compressed-tensors' `weight_scale`, both multiplied into the codes."""
    out = set()
    for t in sources.values():
        role = adapter.role(t.name)
        if role.kind != "shared_down" or t.dtype in _SCALABLE or in_head(t.name, role):
            continue
        scale = next((n for n in (t.name + "_scale_inv", t.name + "_scale") if n in sources), None)
        if scale is None or sources[scale].dtype not in _SCALABLE:
            raise MoePruneError(f"{t.name} is stored as {t.dtype} without a float scale tensor "
                                f"({t.name}_scale_inv or {t.name}_scale): the shared-FFN upweight needs one of "
                                f"{sorted(_SCALABLE)}, or an 8-bit weight with its scale")
        out.add(scale)
    return out


def _expert_like(adapter, name: str) -> bool:
    """Named like one of the adapter's expert tensors, but outside the text decoder layers."""
    if any(name.endswith("." + rel) for rel in adapter.expert_axis_tensors):
        return True
    return bool(adapter.per_expert_pattern and re.search(r"\." + adapter.per_expert_pattern + "$", name))


def _slice(t: SourceTensor, axis: int, ids: list[int], num_experts: int) -> OutTensor:
    """The kept experts' rows of a tensor whose expert axis leads: merged runs of byte ranges."""
    if axis != 0:  # every supported layout puts the expert axis first (rows are contiguous bytes)
        raise MoePruneError(f"{t.name}: expert axis {axis} is not supported: expected the expert axis first")
    row = t.nbytes // num_experts
    pieces, run_start = [], 0
    for i, e in enumerate(ids):
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            first = ids[run_start]
            pieces.append((t.file, t.start + first * row, (e - first + 1) * row))
            run_start = i + 1
    return OutTensor(t.name, t.dtype, (len(ids),) + t.shape[1:], row * len(ids), pieces=pieces)


def _scaled(t: SourceTensor, alpha: float):
    def compute():
        with safe_open(t.file, "pt") as f:
            w = f.get_tensor(t.name)
        return (w.float() * alpha).to(w.dtype)
    return compute


def check_experts(adapter, config: dict, sources: dict[str, SourceTensor], where: Path) -> list[int]:
    """The MoE layers, once the expert tensors agree with the config's expert count (a plan that
    drops nothing)."""
    num_layers = adapter.text_config(config).get("num_hidden_layers")
    layers = _plan(adapter, sources, {}, adapter.num_experts(config), 1.0, num_layers).layers
    if not layers:
        raise MoePruneError(f"{where}: no expert tensors for adapter {adapter.name}: expected an MoE checkpoint")
    return sorted(layers)


def check_checkpoint(model_dir: Path) -> list[int]:
    """What transformers would fail on with a traceback, from config.json and the safetensors
    headers alone: a missing or truncated shard, no weights, an expert count that is not a number
    or disagrees with the expert tensors (the plan of a prune that drops nothing checks all that).
    Returns the MoE layers."""
    config = read_config(model_dir)
    adapter = adapter_for(config)
    text = adapter.text_config(config)
    for key in (adapter.num_experts_key, *adapter.extra_expert_count_keys, adapter.top_k_key):
        value = text.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MoePruneError(f"{Path(model_dir) / 'config.json'}: {key}={value!r}: expected a positive integer")
    try:
        return check_experts(adapter, config, read_sources(Path(model_dir)), where=Path(model_dir))
    except MoePruneError as e:  # a tensor's shape against config.json: say which checkpoint
        if str(model_dir) in str(e):
            raise
        raise MoePruneError(f"{model_dir}: {e} (config.json: {adapter.num_experts_key}="
                            f"{text.get(adapter.num_experts_key)!r})") from None


def prune_checkpoint(src: Path, out: Path, drop_map: DropMap | dict, shared_ffn_alpha: float = 1.0,
                     max_shard_bytes: int = 5_000_000_000, recipe: dict | None = None, mtp_heads: str = "keep") -> dict:
    """Write the pruned checkpoint to `out` (atomically). Returns a summary of what was done.
    `drop_map`: a DropMap, or a plain {layer: [ids]} checked here as one."""
    check_mtp_heads(mtp_heads)
    if not math.isfinite(shared_ffn_alpha):  # NaN weights would score 0 everywhere, not fail
        raise MoePruneError(f"shared_ffn_alpha={shared_ffn_alpha}: expected a finite factor")
    if max_shard_bytes < 1:
        raise MoePruneError(f"max_shard_bytes={max_shard_bytes}: expected a positive shard size")
    src, out = Path(src).resolve(), Path(out).resolve()
    _check_paths(src, out)
    config = artifacts.read_json(src / "config.json")
    adapter = adapter_for(config)
    if (src / SHARED_MARKER).exists() and shared_ffn_alpha != 1.0:
        raise MoePruneError(f"{src} already has its shared FFN upweighted ({SHARED_MARKER}): refusing to apply it twice")
    if not isinstance(drop_map, DropMap):
        drop_map = DropMap.for_model(drop_map, adapter, config, physical=True)
    elif not drop_map.physical:
        raise MoePruneError(f"the drop map keeps {drop_map.kept_counts()} experts per layer and was checked for "
                            f"virtual pruning: expected one checked for a checkpoint (one count in every layer)")
    E = adapter.num_experts(config)
    keep = {layer: [e for e in range(E) if e not in set(d)] for layer, d in drop_map.items()}
    keep_n = E - len(next(iter(drop_map.values()), []))

    num_layers = adapter.text_config(config).get("num_hidden_layers")
    plan = _plan(adapter, read_sources(src), keep, E, shared_ffn_alpha, num_layers, mtp_heads)
    layers, scaled = plan.layers, plan.scaled
    if plan.unpruned:
        log.warning("%d expert tensors outside the %s decoder layers (multi-token-prediction heads, e.g. %s) are "
                    "copied unpruned: transformers ignores them, an engine loading them would need them pruned "
                    "too (prune.mtp_heads=drop leaves the heads out)", len(plan.unpruned), num_layers, plan.unpruned[0])
    if not layers:
        raise MoePruneError(f"{src}: no expert tensors for adapter {adapter.name}: expected an MoE checkpoint")
    if set(drop_map) - layers:
        raise MoePruneError(f"drop map names layers {sorted(set(drop_map) - layers)} that have no experts in {src}")
    if keep_n < E and layers - set(drop_map):
        raise MoePruneError(f"MoE layers {sorted(layers - set(drop_map))} have no drop map entry: expected one per "
                            f"MoE layer, since the pruned config has {keep_n} experts everywhere")
    if shared_ffn_alpha != 1.0 and scaled == 0:
        raise MoePruneError(f"shared_ffn_alpha={shared_ffn_alpha}, but {adapter.name} has no shared FFN: expected 1.0")

    shards = plan_shards(plan.tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(t.nbytes for t in plan.tensors)
    where = next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(where).free
    if free < total:
        raise MoePruneError(f"{where} has {free / 1e9:.2f} GB free: the pruned checkpoint needs {total / 1e9:.2f} GB")

    with artifacts.atomic_dir(out) as tmp:
        for name, shard in zip(names, shards):
            try:
                write_shard(tmp / name, shard, {"format": "pt"})
            except OSError as e:
                why = "disk full" if e.errno == errno.ENOSPC else e.strerror or str(e)
                raise MoePruneError(f"writing {out / name} failed ({why}): nothing was written to {out}, "
                                    f"the source {src} is untouched") from e
        if len(shards) > 1:
            weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
            artifacts.write_json(tmp / INDEX, {"metadata": {"total_size": total},
                                               "weight_map": dict(sorted(weight_map.items()))})
        pruned_config = adapter.pruned_config(config, drop_map)
        if plan.mtp_dropped:
            text = adapter.text_config(pruned_config)
            for key in adapter.mtp_config_keys:
                if key in text:
                    text[key] = 0
        artifacts.write_json(tmp / "config.json", pruned_config)
        for p in src.iterdir():  # tokenizer, chat template, generation config, processor files
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in (
                    "config.json", INDEX, METADATA_FILE, artifacts.MANIFEST):
                shutil.copy2(p, tmp / p.name)
        meta = _metadata(src, adapter, E, keep_n, keep, drop_map, shared_ffn_alpha, scaled, recipe)
        meta["mtp_heads"] = mtp_heads
        meta["unpruned_expert_tensors"] = sorted(plan.unpruned)
        meta["dropped_mtp_tensors"] = sorted(plan.mtp_dropped)
        artifacts.write_json(tmp / METADATA_FILE, meta)
        if shared_ffn_alpha != 1.0:
            (tmp / SHARED_MARKER).write_text(f"{shared_ffn_alpha}\n")
    return {"num_experts_after": keep_n, "shared_ffn_tensors_scaled": scaled, "shards": len(shards),
            "bytes_written": total, "mtp_tensors_dropped": len(plan.mtp_dropped)}


def _metadata(src, adapter, E, keep_n, keep, drop_map, alpha, scaled, recipe) -> dict:
    files = sorted(p for p in src.iterdir()
                   if p.is_file() and (p.suffix == ".safetensors" or p.name in ("config.json", INDEX)))
    previous = src / METADATA_FILE
    return {
        "source": str(src),
        "source_config_sha256": artifacts.hash_file(src / "config.json", full=True),
        # shards above 64 MB are fingerprinted by size + first and last MB (see artifacts.hash_file)
        "source_files": {p.name: artifacts.hash_file(p) for p in files},
        "architecture": adapter.name,
        "num_experts_before": E,
        "num_experts_after": keep_n,
        "keep": {str(layer): ids for layer, ids in sorted(keep.items())},
        "dropped": {str(layer): d for layer, d in sorted(drop_map.items())},
        "shared_ffn_alpha": alpha,
        "shared_ffn_tensors_scaled": scaled,
        "recipe": recipe or {},
        "previous_prune": artifacts.read_json(previous) if previous.is_file() else None,
    }
