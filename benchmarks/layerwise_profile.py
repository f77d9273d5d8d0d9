"""Layer-wise profiling of a checkpoint larger than the GPU memory allowed, against whole-model profiling.

Writes a Gemma 4 26B-A4B-shaped checkpoint of random bf16 weights (`--layers` decoder layers, one
shard per layer), profiles 8 x 2048 tokens with the whole model on the GPU (it fits without a
cap), then caps this process's GPU memory below the checkpoint's size
(`torch.cuda.set_per_process_memory_fraction`) and profiles layer by layer from the shards.
Prints the checkpoint, one layer and the cap in GiB, the layer-wise peak GPU memory, tokens/s of
both (the layer-wise time includes reading every layer from disk), and how far the two profiles
differ; then shows that the whole model does not load under the cap.

    python benchmarks/layerwise_profile.py                        # on a GPU: docs/profiling.md
    python benchmarks/layerwise_profile.py --scale tiny --seq 64  # a CPU smoke run (no cap)

Imports only torch, transformers, safetensors and moeprune's profile modules.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_speed import gemma4_26b_config  # noqa: E402

GiB = 2**30


def write_checkpoint(path: Path, layers: int, scale: str, device) -> dict[str, int]:
    """Random weights, one shard per decoder layer (+ one for the rest); returns bytes per part."""
    from transformers import Gemma4ForCausalLM

    config = gemma4_26b_config(layers, scale)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Gemma4ForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in shapes.items():
        part = f"layer{name.split('.')[2]}" if name.startswith("model.layers.") else "rest"
        parts.setdefault(part, {})[name] = shape
    weight_map, sizes = {}, {}
    g = torch.Generator(device=device).manual_seed(0)
    for part, names in parts.items():
        tensors = {}
        for name, shape in names.items():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale", "layer_scalar")):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
            tensors[name] = t
        file = f"model-{part}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        sizes[part] = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--cap-gib", type=float, default=10.0)
    ap.add_argument("--batch-tokens", type=int, default=8192)  # 16k-token batches' expert activations need ~4 GiB
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--dir", default="/tmp/moeprune_layerwise_bench")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from moeprune.adapters import get_adapter
    from moeprune.prune.calibration import Pass
    from moeprune.prune.profile import profile_model
    from moeprune.prune.profile.layerwise import profile_layerwise

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bfloat16" if cuda else "float32"
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    sizes = write_checkpoint(root / "ckpt", args.layers, args.scale, device)
    written = time.perf_counter() - t0
    total, layer = sum(sizes.values()), sizes["layer0"]
    adapter = get_adapter("gemma4")
    g = torch.Generator().manual_seed(1)
    corpus = {"bench": [Pass(tuple(torch.randint(3, 384, (args.seq,), generator=g).tolist()), "short", 1.0)
                        for _ in range(args.batch)]}
    tokens = args.batch * args.seq
    run = dict(batch_size=args.batch, batch_tokens=args.batch_tokens, on_nonfinite="skip")

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(root / "ckpt", dtype=getattr(torch, dtype)).to(device).eval()
    model.set_experts_implementation("grouped_mm")
    loaded = time.perf_counter() - t0
    profile_model(model, adapter, corpus, **run)  # warm-up
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    whole = profile_model(model, adapter, corpus, **run)
    sync()
    whole_s = time.perf_counter() - t0
    del model
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        total_memory = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GiB / total_memory)

    t0 = time.perf_counter()
    lw = profile_layerwise(root / "ckpt", adapter, corpus, root / "work", dtype, device, **run)
    sync()
    lw_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    rel = max(((lw[k] - whole[k]).abs() / whole[k].abs().clamp(min=1e-12)).max().item()
              for k in ("count", "wnorm", "rnorm", "wsum", "hits", "contrib_sum"))

    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; {args.layers} layers; "
          f"{args.batch}x{args.seq} tokens in batches of {args.batch_tokens}; {dtype}")
    print(f"checkpoint {total / GiB:.2f} GiB on disk (written in {written:.0f} s); one decoder layer "
          f"{layer / GiB:.2f} GiB; embeddings etc. {sizes['rest'] / GiB:.2f} GiB; GPU cap {args.cap_gib:.1f} GiB")
    print(f"whole model   {tokens / whole_s:>9.0f} tokens/s profiling ({whole_s:.2f} s; loading took {loaded:.1f} s, "
          f"{tokens / (whole_s + loaded):.0f} tokens/s with it)")
    print(f"layer-wise    {tokens / lw_s:>9.0f} tokens/s including reading every layer ({lw_s:.2f} s) = "
          f"{whole_s / lw_s:.2f}x whole-model profiling, {(whole_s + loaded) / lw_s:.2f}x load + profile")
    print(f"layer-wise peak GPU memory {peak / GiB:.2f} GiB = {peak / layer:.2f}x one layer "
          f"({peak / (layer + sizes['rest']):.2f}x one layer + embeddings)")
    print(f"max relative difference layer-wise vs whole: {rel:.2e}; non-finite tokens whole "
          f"{int(whole['nonfinite'].sum())}, layer-wise {int(lw['nonfinite'].sum())}")
    if cuda:
        try:
            AutoModelForCausalLM.from_pretrained(root / "ckpt", dtype=torch.bfloat16, device_map="cuda")
            print("whole model under the cap: loaded (the cap is too high to prove anything)")
        except torch.OutOfMemoryError:
            print(f"whole model under the cap: out of memory, as expected ({total / GiB:.1f} GiB > {args.cap_gib} GiB)")
        except Exception as e:  # e.g. device_map without accelerate: the claim stays unshown, say so
            print(f"whole model under the cap: not tried ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
