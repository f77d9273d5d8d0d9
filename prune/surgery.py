"""Streaming expert surgery on a safetensors checkpoint.

Tensor by tensor: expert-axis tensors (fused expert weights, router rows, per-expert scales) are
sliced to the kept ids, one-tensor-per-expert weights are kept and renumbered contiguously, the
shared FFN's down projection is optionally scaled, everything else is copied. Output shards are
bounded in size, so peak memory is about one shard plus one tensor; the source is only read. The
result is built in a temp dir beside the output and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeprune import artifacts
from moeprune.adapters import adapter_for
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")

METADATA_FILE = "expert_drop_metadata.json"
SHARED_MARKER = ".shared_applied"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEX = "model.safetensors.index.json"


def shard_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single model.safetensors."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = artifacts.read_json(index)["weight_map"]
    elif (model_dir / "model.safetensors").is_file():
        with safe_open(model_dir / "model.safetensors", "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise MoePruneError(f"{model_dir}: no model.safetensors or {INDEX}: expected a safetensors checkpoint")
    missing = sorted({s for s in weight_map.values() if not (model_dir / s).is_file()})
    if missing:
        raise MoePruneError(f"{model_dir}: the index names missing shard files {missing}")
    return weight_map


class _ShardWriter:
    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.buf and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buf[name] = t.contiguous()
        self.size += nbytes

    def flush(self) -> None:
        if not self.buf:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buf, str(self.out_dir / name), metadata={"format": "pt"})
        self.shards.append(list(self.buf))
        self.buf, self.size = {}, 0

    def finish(self) -> dict[str, str]:
        self.flush()
        total = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            old = self.out_dir / f"model-{i + 1:05d}.safetensors"
            final = old if total > 1 else self.out_dir / "model.safetensors"
            if total > 1:
                final = self.out_dir / f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            old.rename(final)
            weight_map.update({n: final.name for n in names})
        return weight_map


def prune_checkpoint(src: Path, out: Path, drop_map: dict[int, list[int]], shared_ffn_alpha: float = 1.0,
                     max_shard_bytes: int = 5_000_000_000, recipe: dict | None = None) -> dict:
    """Write the pruned checkpoint to `out` (atomically). Returns a summary of what was done."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == src or src in out.parents:
        raise MoePruneError(f"output dir {out} is the source dir or inside it: refusing to write there")
    config = json.loads((src / "config.json").read_text())
    adapter = adapter_for(config)
    if (src / SHARED_MARKER).exists() and shared_ffn_alpha != 1.0:
        raise MoePruneError(f"{src} already has its shared FFN upweighted ({SHARED_MARKER}): refusing to apply it twice")
    E = adapter.num_experts(config)
    sizes = {E - len(d) for d in drop_map.values()}
    if len(sizes) > 1:
        raise MoePruneError(f"physical pruning needs one kept count for every layer, got {sorted(sizes)}")
    keep_n = sizes.pop() if sizes else E
    adapter.validate_keep(config, keep_n)
    keep = {layer: [e for e in range(E) if e not in set(d)] for layer, d in drop_map.items()}
    weight_map = shard_map(src)

    seen_layers, scaled = set(), 0
    with artifacts.atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            with safe_open(src / shard, "pt") as f:
                present = set(f.keys())
                for name in sorted(names):
                    if name not in present:
                        raise MoePruneError(f"{src / shard}: the index names tensor {name!r}, which the shard lacks")
                    role = adapter.role(name)
                    if role.kind == "expert_axis":
                        t = f.get_tensor(name)
                        if t.shape[role.axis] != E:
                            raise MoePruneError(f"{name}: expert axis {role.axis} has size {t.shape[role.axis]}, expected {E}")
                        seen_layers.add(role.layer)
                        if role.layer in keep:
                            t = t.index_select(role.axis, torch.tensor(keep[role.layer]))
                        writer.add(name, t)
                    elif role.kind == "per_expert":
                        seen_layers.add(role.layer)
                        ids = keep.get(role.layer, list(range(E)))
                        if role.expert in ids:
                            writer.add(role.rename.format(expert=ids.index(role.expert)), f.get_tensor(name))
                    elif role.kind == "shared_down" and shared_ffn_alpha != 1.0:
                        t = f.get_tensor(name)
                        writer.add(name, (t.float() * shared_ffn_alpha).to(t.dtype))
                        scaled += 1
                    else:
                        writer.add(name, f.get_tensor(name))
        if not seen_layers:
            raise MoePruneError(f"{src}: no expert tensors found for adapter {adapter.name}: not an MoE checkpoint?")
        unknown_layers = sorted(set(keep) - seen_layers)
        if unknown_layers:
            raise MoePruneError(f"drop map names layers {unknown_layers} that have no experts in {src}")
        if shared_ffn_alpha != 1.0 and scaled == 0:
            raise MoePruneError(f"shared_ffn_alpha={shared_ffn_alpha} but {adapter.name} checkpoints here have no shared FFN tensor")
        new_map = writer.finish()
        if len(set(new_map.values())) > 1:
            total = sum((tmp / s).stat().st_size for s in set(new_map.values()))
            artifacts.write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": new_map})
        (tmp / "config.json").write_text(json.dumps(adapter.with_num_experts(config, keep_n), indent=2) + "\n")
        for p in src.iterdir():  # tokenizer, chat template, generation config, processor files
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in (
                "config.json", INDEX, METADATA_FILE, artifacts.MANIFEST):
                shutil.copy2(p, tmp / p.name)
        meta = {
            "source": str(src),
            "source_config_sha256": artifacts.hash_file(src / "config.json"),
            "architecture": adapter.name,
            "num_experts_before": E,
            "num_experts_after": keep_n,
            "keep": {str(layer): ids for layer, ids in sorted(keep.items())},
            "dropped": {str(layer): sorted(d) for layer, d in sorted(drop_map.items())},
            "shared_ffn_alpha": shared_ffn_alpha,
            "shared_ffn_tensors_scaled": scaled,
            "recipe": recipe or {},
        }
        artifacts.write_json(tmp / METADATA_FILE, meta)
        if shared_ffn_alpha != 1.0:
            (tmp / SHARED_MARKER).write_text(f"{shared_ffn_alpha}\n")
    return {"num_experts_after": keep_n, "shared_ffn_tensors_scaled": scaled}
