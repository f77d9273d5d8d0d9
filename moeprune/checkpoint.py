"""A safetensors checkpoint's tensors as its headers describe them: every tensor's name, dtype,
shape and absolute byte range, from the index or the single model.safetensors, with no tensor
read. On the ground floor: surgery plans from it, the preflight checks a checkpoint with it, and
the hf backend reads the stored dtypes from it.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`), then one data buffer.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune import artifacts
from moeprune.errors import MoePruneError

INDEX = "model.safetensors.index.json"
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str  # safetensors code: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, SourceTensor], dict[str, str]]:
    """The tensors of one safetensors file (absolute offsets) and its `__metadata__`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise MoePruneError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MoePruneError(f"{path}: unreadable safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end or 8 + n + end > size:
            raise MoePruneError(f"{path}: tensor {name!r} lies outside the file (truncated shard?)")
        tensors[name] = SourceTensor(name, path, info["dtype"], tuple(info["shape"]), 8 + n + begin, 8 + n + end)
    return tensors, meta


def read_sources(model_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint, from the index (or the single model.safetensors)."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = artifacts.read_json(index)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoePruneError(f"{index}: unreadable index ({type(e).__name__}: {e}): expected a weight_map") from None
    elif (model_dir / "model.safetensors").is_file():
        weight_map = None
    else:
        raise MoePruneError(f"{model_dir}: no model.safetensors or {INDEX}: expected a safetensors checkpoint")
    if weight_map is None:
        return read_header(model_dir / "model.safetensors")[0]
    missing = sorted({s for s in weight_map.values() if not (model_dir / s).is_file()})
    if missing:
        raise MoePruneError(f"{index} names shard files that are missing: {missing}")
    headers = {s: read_header(model_dir / s)[0] for s in sorted(set(weight_map.values()))}
    out = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise MoePruneError(f"{index} names tensor {name!r} in {shard}, which has no such tensor")
        out[name] = headers[shard][name]
    return out


def stored_dtypes(model_dir: Path) -> dict[str, torch.dtype]:
    """The checkpoint's dtype of each floating-point tensor (what a scaled tensor is rounded back to)."""
    return {t.name: TORCH_DTYPES[t.dtype] for t in read_sources(Path(model_dir)).values() if t.dtype in TORCH_DTYPES}


def parameter_count(model_dir: Path) -> int:
    """Parameters of the checkpoint, from the safetensors headers (no weights loaded)."""
    return sum(math.prod(t.shape) for t in read_sources(Path(model_dir)).values())
