"""Generation throughput of the hf evaluation backend, measured in ONE run:

  sequential  `model.generate` one prompt at a time (bs 1, KV cache): what a naive harness does
  batched     `HFBackend.generate`: prompts sorted by length, left-padded batches, KV cache

Random bf16 weights at Gemma 4 26B-A4B layer shapes (hidden 2816, 128 experts top-8, expert
intermediate 704, vocab 262144) with a few decoder layers; toy-world prompts through the toy
tokenizer. Prints generated tokens/s for both and their ratio (goal >= 5x). Sequential runs on a
subset of the prompts: its rate does not depend on how many it sees.

    python benchmarks/generate_speed.py                  # on a GPU: the numbers in docs/evaluation.md
    python benchmarks/generate_speed.py --scale tiny     # a CPU smoke run of the same code

Needs only torch and transformers (the GPU machine has no hydra): it maps the repo's `evaluate/`
folder to `moeprune.evaluate` itself when moeprune is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_speed import gemma4_26b_config, randomize_  # noqa: E402  (the same shapes and weights)


def _map_evaluate_package() -> None:
    """A plain checkout has `evaluate/` at the top; the installed layout calls it moeprune.evaluate."""
    if importlib.util.find_spec("moeprune.evaluate") is not None:
        return
    spec = importlib.util.spec_from_file_location("moeprune.evaluate", ROOT / "evaluate" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "evaluate")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["moeprune.evaluate"] = module
    spec.loader.exec_module(module)


def prompts(n: int) -> list[str]:
    from moeprune.toy import world

    tasks = [t for c in world.CLASSES for t in world.make_tasks(c, n, "test", 0)]
    # Two to six tasks per prompt: lengths vary as in a real bench, so batches carry padding.
    return ["\n".join(t.prompt for t in tasks[i:i + 2 + i % 5]) for i in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def sequential(model, tok, texts: list[str], max_new: int, device) -> tuple[int, float]:
    eos = model.generation_config.eos_token_id
    sync(device)
    t0 = time.perf_counter()
    tokens = 0
    for text in texts:
        enc = tok(text, return_tensors="pt").to(device)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        tokens += next((k for k, t in enumerate(new) if t == eos), len(new))
    sync(device)
    return tokens, time.perf_counter() - t0


def batched(backend, texts: list[str], max_new: int, device) -> tuple[int, float]:
    sync(device)
    t0 = time.perf_counter()
    comps = backend.generate(texts, max_new)
    sync(device)
    return sum(c.tokens for c in comps), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--sequential-prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--experts", default="grouped_mm", help="transformers experts implementation")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()

    _map_evaluate_package()
    from transformers import Gemma4ForCausalLM

    from moeprune.evaluate.backends.hf import HFBackend
    from moeprune.toy.tokenizer import build_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # ~4B parameters at full scale: build them where they will run
        model = Gemma4ForCausalLM(gemma4_26b_config(args.layers, args.scale)).to(dtype)
    randomize_(model)
    model.eval()
    model.set_experts_implementation(args.experts)
    tok = build_tokenizer()
    tok.padding_side = "left"
    texts = prompts(args.prompts)
    backend = HFBackend(ROOT, batch_size=args.batch_size, model=model, tokenizer=tok)

    batched(backend, texts[:4], 4, device)  # warm-up: kernels, allocator
    sequential(model, tok, texts[:1], 4, device)
    seq_tokens, seq_s = sequential(model, tok, texts[:args.sequential_prompts], args.max_new_tokens, device)
    bat_tokens, bat_s = batched(backend, texts, args.max_new_tokens, device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "scale": args.scale, "layers": args.layers,
        "experts_implementation": args.experts, "max_new_tokens": args.max_new_tokens,
        "sequential": {"prompts": args.sequential_prompts, "tokens": seq_tokens, "seconds": round(seq_s, 3),
                       "tokens_per_s": round(seq_tokens / seq_s, 1)},
        "batched": {"prompts": len(texts), "batch_size": args.batch_size, "tokens": bat_tokens,
                    "seconds": round(bat_s, 3), "tokens_per_s": round(bat_tokens / bat_s, 1)},
    }
    result["speedup"] = round(result["batched"]["tokens_per_s"] / result["sequential"]["tokens_per_s"], 2)
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
