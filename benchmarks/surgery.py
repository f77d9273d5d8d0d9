"""Surgery throughput and memory on a multi-GB checkpoint at Gemma 4 26B-A4B shapes (CPU, local disk).

Builds a random bf16 checkpoint (embeddings + a few decoder layers at the real shapes: 128 experts,
hidden 2816, expert intermediate 704, dense FFN 2112, vocab 262144; one shard per layer), then from
one run prints:
  - throughput: bytes written per second by the surgery (128 -> 98 experts per layer, shared-FFN
    alpha 1.2) relative to copying the source shards with shutil.copyfile, both until fsync'ed
    (goal >= 0.8x);
  - peak RSS of the surgery process relative to the largest tensor (goal <= 2x).
The surgery runs in a fresh child process, whose peak RSS (VmHWM, Linux) is its own. Copy and
surgery run in adjacent pairs (alternating which goes first), each after a sync with the source
evicted from the page cache, and the median of the per-pair ratios is reported, since a shared
disk's speed drifts between runs.

    python benchmarks/surgery.py [--layers 3] [--pairs 5] [--dir /tmp] [--keep-files]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

E, H, I_MOE, I_DENSE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 128, 2816, 704, 2112, 262144, 16, 8, 256
KEEP = 98


def layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "experts.gate_up_proj": (E, 2 * I_MOE, H),
        p + "experts.down_proj": (E, H, I_MOE),
        p + "router.proj.weight": (E, H),
        p + "router.per_expert_scale": (E,),
        p + "router.scale": (H,),
        p + "mlp.gate_proj.weight": (I_DENSE, H),
        p + "mlp.up_proj.weight": (I_DENSE, H),
        p + "mlp.down_proj.weight": (H, I_DENSE),
        p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, H),
        p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, H),
        p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, H),
        p + "self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
        **{p + n: (H,) for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                 "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")},
    }


def build(src: Path, layers: int) -> tuple[int, int]:
    """Write the checkpoint; returns (total bytes of tensors, bytes of the largest tensor)."""
    src.mkdir(parents=True)
    groups = [{"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}] + [layer_tensors(i) for i in range(layers)]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total, largest = {}, 0, 0
    for name, group in zip(names, groups):
        tensors = {k: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02) for k, shape in group.items()}
        save_file(tensors, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        sizes = [t.numel() * 2 for t in tensors.values()]
        total, largest = total + sum(sizes), max(largest, *sizes)
        del tensors
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "num_hidden_layers": layers,
        "hidden_size": H, "num_experts": E, "top_k_experts": 8, "moe_intermediate_size": I_MOE,
        "intermediate_size": I_DENSE, "vocab_size": VOCAB, "enable_moe_block": True}))
    (src / "tokenizer_config.json").write_text("{}")
    return total, largest


# ru_maxrss would not do: Linux carries the parent's high-water mark across fork + exec.
CHILD = """
import json, re, sys, time
from moeprune.prune.surgery import prune_checkpoint
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
src, out, drop, shard = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
before = hwm()
t = time.perf_counter()
info = prune_checkpoint(src, out, drop, shared_ffn_alpha=1.2, max_shard_bytes=shard)
print(json.dumps({"seconds": time.perf_counter() - t, "rss_before": before, "peak_rss": hwm(), **info}))
"""


def cold_start(src: Path, stale: Path) -> None:
    """Remove the previous run's output, flush, and evict the source from the page cache: every
    run reads the source from disk, as it would for a 50 GB checkpoint that cannot stay cached."""
    shutil.rmtree(stale, ignore_errors=True)
    os.sync()
    for p in src.glob("*.safetensors"):
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_surgery(src: Path, out: Path, drop: dict, shard_bytes: int) -> dict:
    cold_start(src, out)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), json.dumps(drop), str(shard_bytes)],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_shards(src: Path, dst: Path) -> tuple[float, int]:
    cold_start(src, dst)
    dst.mkdir()
    t, size = time.perf_counter(), 0
    for p in sorted(src.glob("*.safetensors")):
        shutil.copyfile(p, dst / p.name)
        with open(dst / p.name, "rb+") as f:  # durable, as surgery's shards are
            os.fsync(f.fileno())
        size += p.stat().st_size
    return time.perf_counter() - t, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--max-shard-gb", type=float, default=2.0)
    ap.add_argument("--pairs", type=int, default=5, help="copy + surgery runs to compare")
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moeprune-bench-", dir=args.dir))
    try:
        src = work / "src"
        t = time.perf_counter()
        total, largest = build(src, args.layers)
        print(f"built {total / 1e9:.2f} GB in {args.layers + 1} shards ({time.perf_counter() - t:.0f} s); "
              f"largest tensor {largest / 1e9:.3f} GB")
        rng = random.Random(0)
        drop = {i: sorted(rng.sample(range(E), E - KEEP)) for i in range(args.layers)}

        shard_bytes, ratios, runs = int(args.max_shard_gb * 1e9), [], []
        for i in range(args.pairs):  # adjacent pairs share the disk's state; alternate who goes first
            if i % 2:
                run = run_surgery(src, work / "pruned", drop, shard_bytes)
                copy_s, copy_bytes = copy_shards(src, work / "copy")
            else:
                copy_s, copy_bytes = copy_shards(src, work / "copy")
                run = run_surgery(src, work / "pruned", drop, shard_bytes)
            runs.append(run)
            ratios.append((run["bytes_written"] / run["seconds"]) / (copy_bytes / copy_s))
            print(f"pair {i + 1}: copy {copy_bytes / 1e9:.2f} GB in {copy_s:.2f} s ({copy_bytes / copy_s / 1e9:.2f} GB/s), "
                  f"surgery {run['bytes_written'] / 1e9:.2f} GB in {run['seconds']:.2f} s "
                  f"({run['bytes_written'] / run['seconds'] / 1e9:.2f} GB/s): {ratios[-1]:.2f}x", flush=True)
        peak, before = max(r["peak_rss"] for r in runs), runs[0]["rss_before"]
        print(f"surgery: {E}->{KEEP} experts/layer, alpha 1.2, {runs[0]['shards']} output shards")
        print(f"throughput vs copy: median {statistics.median(ratios):.2f}x over {len(ratios)} pairs "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}x; goal >= 0.8x)")
        print(f"peak RSS: {peak / 1e9:.3f} GB = {peak / largest:.2f}x the largest tensor "
              f"(goal <= 2x); {before / 1e9:.3f} GB of it is the interpreter + imports before surgery")

        out = work / "pruned"  # spot check: a kept expert's rows are the source's
        layer, new = args.layers - 1, KEEP // 2
        old = [e for e in range(E) if e not in drop[layer]][new]
        wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        name = f"model.layers.{layer}.experts.down_proj"
        src_wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(out / wm[name], "pt") as a, safe_open(src / src_wm[name], "pt") as b:
            assert torch.equal(a.get_slice(name)[new:new + 1], b.get_slice(name)[old:old + 1])
        print("spot check: kept expert rows equal the source's")
    finally:
        if args.keep_files:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
