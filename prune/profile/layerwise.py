"""Layer-wise profiling: models larger than the device, one decoder layer on it at a time.

The calibration tokens are embedded once; then for each decoder layer only that layer's tensors
are read from the safetensors shards, every batch's hidden states run through it (MoE layers under
the same statistics implementation as the whole-model profiler) and the outputs become the next
layer's inputs. A layer's input and output hidden states live in RAM when both fit in
`hidden_ram_bytes`, else in memory-mapped files. After every layer the hidden states and the statistics so far are checkpointed atomically,
so a killed run resumes at the first unfinished layer with identical results.

What each layer is called with (attention masks per layer type, position embeddings, per-layer
inputs) is taken from the model's own forward: the decoder stack runs with every layer replaced
by a stub that records its arguments, so nothing of a family's forward is re-implemented. Layer
weights are loaded through transformers' own checkpoint conversion (renames, per-expert tensors
fused on load), so Hub layouts load as `from_pretrained` would load them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moeprune.checkpoint import read_sources
from moeprune.errors import MoePruneError
from moeprune.profile import Profile
from moeprune.prune.profile.batches import corpus_meta, corpus_tokens, finish, length_batches, pad_right
from moeprune.prune.profile.stats import Accumulator, expert_weight_norms, intermediate_dim, profiling

STATE = "state.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Stop(Exception):
    """Raised by the stub of the layer whose inputs were wanted: the rest of the stack is skipped."""


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records the arguments the stack calls it with."""

    def __init__(self, index: int, sink: dict):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, *args, **kwargs):
        if self.index == self.sink["want"]:
            self.sink["call"] = (args, kwargs)
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


class LayerLoader:
    """The decoder stack as a meta skeleton: real embeddings etc. on the device, layers on demand."""

    def __init__(self, model_dir: Path, adapter, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig

        self.model_dir, self.adapter, self.device, self.dtype = Path(model_dir), adapter, device, dtype
        config = AutoConfig.from_pretrained(model_dir)
        text_cfg = config.get_text_config()
        if getattr(text_cfg, "num_kv_shared_layers", 0):
            raise MoePruneError("profile.mode=layerwise: this model shares KV caches across layers "
                                "(num_kv_shared_layers > 0), so a layer cannot run alone; use profile.mode=whole")
        self.model = _skeleton(config, dtype)
        self.decoder = adapter.text_model(self.model)
        self.decoder_path = next(n for n, m in self.model.named_modules() if m is self.decoder)
        self.meta_layers = list(self.decoder.layers)
        self.moe_layers = [b.layer for b in adapter.moe_blocks(self.model)]
        if not self.moe_layers:
            raise MoePruneError(f"the model has no MoE layers to profile: expected a {adapter.name} model with experts")
        first = adapter.moe_blocks(self.model)[0].experts
        self.num_experts, self.neuron_dim = first.num_experts, intermediate_dim(first)
        self.hidden = text_cfg.hidden_size
        self.sink: dict = {"want": None}
        self.decoder.layers = nn.ModuleList(_Recorder(i, self.sink) for i in range(len(self.meta_layers)))
        self.shard_of = {name: t.file for name, t in read_sources(self.model_dir).items()}  # read once
        self.keys, self.prefix = _checkpoint_keys(list(self.shard_of))
        self._materialize_outside_layers()

    def _buffers_on_device(self, module: nn.Module) -> None:
        """Buffers to the device and recomputed (rotary tables, scales: not in checkpoints). Parameters
        stay meta until loading replaces them, so no memory goes to weights about to be overwritten."""
        for sub in module.modules():
            for name, buf in sub.named_buffers(recurse=False):
                if buf.is_meta:
                    sub._buffers[name] = torch.empty_like(buf, device=self.device)
            self.model._init_weights(sub)

    def _materialize_outside_layers(self) -> None:
        """Embeddings, norms, rotary tables of the decoder stack on the device; other parts stay meta."""
        for name, module in self.decoder.named_children():
            if name != "layers":
                self._buffers_on_device(module)
        outside = [k for k in self.keys if k.startswith(self.prefix) and k[len(self.prefix):].split(".")[0] != "layers"]
        info = self._load(outside, "the embeddings")
        path = self.decoder_path
        missing = sorted(k for k in info.missing_keys
                         if k.startswith(path + ".") and not k.startswith(path + ".layers."))
        if missing:
            raise MoePruneError(f"{self.model_dir}: the checkpoint lacks {missing[:4]}: expected every tensor "
                                "of the decoder stack outside its layers (embeddings, norms)")

    def layer(self, i: int) -> nn.Module:
        """Decoder layer i with its weights, on the device."""
        layer = self.meta_layers[i]
        self._buffers_on_device(layer)
        stub, self.decoder.layers[i] = self.decoder.layers[i], layer
        try:
            self._load([k for k, layer_i in self.keys.items() if layer_i == i], f"layer {i}", layer_prefix=i)
        finally:
            self.decoder.layers[i] = stub
        return layer

    def release(self, i: int) -> None:
        self.meta_layers[i].to("meta")

    def _load(self, names: list[str], what: str, layer_prefix: int | None = None):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tensors, by_shard = {}, {}
        for n in names:
            by_shard.setdefault(self.shard_of[n], []).append(n)
        for shard, shard_names in by_shard.items():
            with safe_open(shard, framework="pt", device="cpu") as f:
                tensors.update({n: f.get_tensor(n) for n in shard_names})
        cfg = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(self.model), dtype=self.dtype,
                                  device_map={"": str(self.device)})
        info, _ = convert_and_load_state_dict_in_model(self.model, tensors, cfg)
        if layer_prefix is not None:
            mine = f"{self.decoder_path}.layers.{layer_prefix}."
            missing = sorted(k for k in info.missing_keys if k.startswith(mine))
            if missing:
                raise MoePruneError(f"{self.model_dir}: {what} is missing tensors {missing[:4]}: expected a complete, "
                                    "unquantized checkpoint")
        return info

    def layer_inputs(self, i: int, ids: torch.Tensor, mask: torch.Tensor) -> tuple[tuple, dict]:
        """The arguments the model's own forward passes to layer i for this batch."""
        self.sink["want"] = i
        try:
            self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            return self.sink.pop("call")
        raise MoePruneError(f"layer {i} was never called by the model's forward")

    def blocks(self, layer: nn.Module, i: int):
        return self.adapter.moe_blocks(_OneLayer(i, layer))


def _state(acc: Accumulator, weight_norm: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {"sums": acc.sums, "weight_norm": weight_norm}
    if acc.energy is not None:
        state["energy"] = acc.energy
    return state


class _OneLayer:
    """Looks like a decoder stack to an adapter, holding only layer i."""

    def __init__(self, i: int, layer: nn.Module):
        self.layers = [None] * i + [layer]


def _skeleton(config, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:  # multimodal wrappers (the text model sits inside)
            return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def _checkpoint_keys(names: list[str]) -> tuple[dict[str, int | None], str]:
    """{tensor name: decoder layer or None}, and the decoder stack's prefix (e.g. `model.`)."""
    from moeprune.adapters.base import LAYER_RE

    keys, prefixes = {}, set()
    for n in names:
        m = LAYER_RE.match(n)
        keys[n] = int(m["layer"]) if m else None
        if m:
            prefixes.add(m["prefix"][: -len("layers.")])
    if len(prefixes) != 1:
        raise MoePruneError(f"{model_dir}: expected decoder layers under one prefix, "
                            f"found {sorted(prefixes) or 'none'}")
    return keys, prefixes.pop()


# ---- hidden states and checkpoints ---------------------------------------------------------------
class Checkpoints:
    """`work/state.json` names the number of finished layers k; `hidden_k.bin` holds the inputs of
    layer k (all batches, [rows, hidden] raw), `stats_k.safetensors` the statistics so far. Files
    are written under temporary names and renamed, then the state is updated: a kill at any point
    leaves the last committed layer readable."""

    def __init__(self, work: Path, key: str, rows: int, hidden: int, dtype: torch.dtype, ram_bytes: int, pin: bool):
        self.work, self.key, self.rows, self.width, self.dtype = Path(work), key, rows, hidden, dtype
        # a layer reads one buffer (its inputs) and writes another (its outputs): two live at once
        self.in_ram = 2 * rows * hidden * dtype.itemsize <= ram_bytes
        self.pin = pin and self.in_ram
        self.work.mkdir(parents=True, exist_ok=True)

    def done(self) -> int:
        state = self.work / STATE
        if not state.is_file():
            return -1
        data = json.loads(state.read_text())
        if data.get("key") != self.key:
            raise MoePruneError(f"{self.work} holds a layer-wise run of another model/corpus/config: "
                                "remove it or set profile.work_dir elsewhere")
        return int(data["done"])

    def new_hidden(self, k: int) -> torch.Tensor:
        if self.in_ram:
            return torch.empty(self.rows, self.width, dtype=self.dtype, pin_memory=self.pin)
        tmp = self.work / f"hidden_{k}.bin.tmp"
        with open(tmp, "wb") as f:
            f.truncate(self.rows * self.width * self.dtype.itemsize)
        return torch.from_file(str(tmp), shared=True, size=self.rows * self.width, dtype=self.dtype).view(self.rows, -1)

    def hidden(self, k: int) -> torch.Tensor:
        mapped = torch.from_file(str(self.work / f"hidden_{k}.bin"), shared=False, size=self.rows * self.width,
                                 dtype=self.dtype).view(self.rows, -1)
        if not self.in_ram:
            return mapped
        out = torch.empty_like(mapped, pin_memory=self.pin)
        return out.copy_(mapped)

    def commit(self, k: int, hidden: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        tmp = self.work / f"hidden_{k}.bin.tmp"
        if self.in_ram:
            hidden.view(torch.uint8).numpy().tofile(tmp)
        # else: `hidden` maps tmp (shared): its pages are the file's, visible once renamed
        os.replace(tmp, self.work / f"hidden_{k}.bin")
        save_file({n: t.contiguous().cpu() for n, t in stats.items()}, str(self.work / f"stats_{k}.tmp"))
        os.replace(self.work / f"stats_{k}.tmp", self.work / f"stats_{k}.safetensors")
        from moeprune.artifacts import write_json

        write_json(self.work / STATE, {"key": self.key, "done": k})
        for old in (self.work / f"hidden_{k - 1}.bin", self.work / f"stats_{k - 1}.safetensors"):
            old.unlink(missing_ok=True)

    def stats(self, k: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.work / f"stats_{k}.safetensors"))

    def clear(self) -> None:
        for f in self.work.iterdir():
            f.unlink()
        self.work.rmdir()


# ---- the run -------------------------------------------------------------------------------------
@torch.no_grad()
def profile_layerwise(model_dir: Path, adapter, corpus: dict[str, list], work_dir: Path, dtype: str = "float32",
                      device: torch.device | str = "cpu", batch_size: int = 64, batch_tokens: int = 65536,
                      pad_id: int = 0, neuron_energy: bool = False, on_nonfinite: str = "error",
                      hidden_ram_bytes: int = 8 << 30, progress: bool = False, keep_work: bool = False) -> Profile:
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise MoePruneError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    device = torch.device(device)
    loader = LayerLoader(Path(model_dir), adapter, device, DTYPES[dtype])
    batches = [(ci, b) for ci, passes in enumerate(corpus.values())
               for b in length_batches(passes, batch_size, batch_tokens)]
    offsets, rows = [], 0
    for _, b in batches:
        offsets.append(rows)
        rows += len(b) * max(len(p.ids) for p in b)
    key = corpus_meta(corpus)["corpus_sha256"] + f"|{model_dir}|{dtype}|{batch_size}|{batch_tokens}|{neuron_energy}"
    ckpt = Checkpoints(work_dir, key, rows, loader.hidden, DTYPES[dtype], hidden_ram_bytes, device.type == "cuda")
    acc = Accumulator(len(corpus), len(loader.moe_layers), loader.num_experts, device,
                      loader.neuron_dim if neuron_energy else None)
    weight_norm = torch.zeros(len(loader.moe_layers), loader.num_experts)
    L = len(loader.meta_layers)
    done = ckpt.done()
    if done < 0:  # layer 0's inputs: the embeddings, as the model's forward computes them
        h = ckpt.new_hidden(0)
        for (ci, b), off in zip(batches, offsets):
            ids, mask, _ = pad_right(b, pad_id, device)
            args, kwargs = loader.layer_inputs(0, ids, mask)
            x = args[0] if args else kwargs["hidden_states"]
            h[off:off + x.shape[0] * x.shape[1]] = x.reshape(-1, x.shape[-1]).cpu()
        ckpt.commit(0, h, _state(acc, weight_norm))
        done, src = 0, h  # already in hand: no second copy read back
        del h
    else:  # resuming: the last committed layer's outputs
        src = ckpt.hidden(done)
    saved = ckpt.stats(done)
    acc.sums.copy_(saved["sums"])
    weight_norm.copy_(saved["weight_norm"])
    if acc.energy is not None:
        acc.energy.copy_(saved["energy"])
    tokens = sum(len(p.ids) for _, b in batches for p in b)
    with tqdm(total=tokens * (L - done), unit="tok", unit_scale=True, disable=not progress,
              desc="profile layer-wise") as bar:
        for i in range(done, L):
            dst = ckpt.new_hidden(i + 1)
            layer = loader.layer(i)
            blocks = loader.blocks(layer, i)
            moe = loader.moe_layers.index(i) if blocks else None
            with profiling(blocks, adapter, acc, [moe]) if blocks else contextlib.nullcontext():
                for (ci, b), off in zip(batches, offsets):
                    ids, mask, seq = pad_right(b, pad_id, device)
                    args, kwargs = loader.layer_inputs(i, ids, mask)
                    n = ids.numel()
                    x = src[off:off + n].view(*ids.shape, -1).to(device, non_blocking=True)
                    acc.begin(ci, b[0].weight, seq, len(b))
                    y = layer(x, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": x})
                    y = y[0] if isinstance(y, tuple) else y
                    dst[off:off + n] = y.reshape(n, -1).cpu()
                    bar.update(sum(len(p.ids) for p in b))
                    del x, y  # on CPU x is a view of src: it would keep the old buffer alive past this layer
            if blocks:
                weight_norm[moe] = expert_weight_norms(blocks[0].experts)
            loader.release(i)
            if device.type == "cuda":  # hand the layer's blocks back: under a memory cap, fragments count
                torch.cuda.empty_cache()
            ckpt.commit(i + 1, dst, _state(acc, weight_norm))
            src = dst  # the next layer's inputs (in RAM, or the memory map now renamed)
            del dst
    classes = list(corpus)
    stats = finish(acc, classes, loader.moe_layers, on_nonfinite)
    stats["weight_norm"] = weight_norm
    if not keep_work:
        ckpt.clear()
    meta = {**corpus_meta(corpus), "hidden_states": "ram" if ckpt.in_ram else "memmap"}
    return Profile(classes, loader.moe_layers, loader.num_experts, stats, corpus_tokens(corpus), meta)

