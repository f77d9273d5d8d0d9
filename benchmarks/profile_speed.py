"""Profiling speed at Gemma 4 26B-A4B shapes, three ways, measured side by side in ONE run:

  plain     the decoder forward with transformers' `grouped_mm` experts (no statistics)
  moeprune  the same forward under moeprune's profiling experts implementation (all statistics)
  hook      a per-expert forward-hook profiler as the reference tool does it: after each experts
            module, loop over experts, select each one's tokens (a host sync per expert), recompute
            its output and accumulate the same per-pass statistics

Random bf16 weights, a few decoder layers, 8 x 2048 tokens. Prints tokens/s and the ratios to
plain; the goal is moeprune >= 0.9x plain. Also checks that profiling leaves the outputs
bit-identical and that the two profilers agree.

    python benchmarks/profile_speed.py                 # on a GPU: the numbers in docs/profiling.md
    python benchmarks/profile_speed.py --scale tiny    # a CPU smoke run of the same code

Imports only torch, transformers and moeprune's profile modules (the GPU machine has no hydra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# hidden 2816, 128 experts top-8, expert intermediate 704, dense FFN 2112 (docs/profiling.md)
FULL = dict(hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, num_experts=128, top_k_experts=8,
            num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512, sliding_window=1024,
            vocab_size=262144)
TINY = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_experts=8, top_k_experts=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32, sliding_window=32,
            vocab_size=384)


def gemma4_26b_config(layers: int, scale: str = "full"):
    """A Gemma 4 26B-A4B-shaped text config with `layers` decoder layers (5 sliding : 1 full)."""
    from transformers import Gemma4TextConfig

    types = ["full_attention" if i % 6 == 5 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    return Gemma4TextConfig(**(FULL if scale == "full" else TINY), num_hidden_layers=layers, layer_types=types,
                            enable_moe_block=True, hidden_size_per_layer_input=0, max_position_embeddings=8192,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2, architectures=["Gemma4ForCausalLM"])


def randomize_(model, std: float = 0.02) -> None:
    """Random weights that keep activations finite through the stack: norms and scales at one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)


class HookProfiler:
    """The reference tool's approach: a forward hook on each experts module, one expert at a time."""

    def __init__(self, adapter, blocks, seq_len: int):
        self.adapter, self.blocks, self.seq_len = adapter, blocks, seq_len
        E = blocks[0].experts.num_experts
        self.acc = torch.zeros(len(blocks), E, 5, dtype=torch.float64, device=blocks[0].experts.down_proj.device)
        self.handles = []

    def __enter__(self):
        self.handles = [b.experts.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, li):
        def hook(experts, args, _out):
            x, idx, w = args[0], args[1], args[2]
            num_seqs = x.shape[0] // self.seq_len
            for e in range(experts.num_experts):
                tok, slot = torch.where(idx == e)
                if tok.numel() == 0:  # a host sync per expert, as in the reference
                    continue
                raw = self.adapter.expert_output(experts, e, x[tok]).float().norm(dim=-1)
                g = w[tok, slot].float()
                seq = tok // self.seq_len
                per_w = torch.zeros(num_seqs, device=x.device).index_add_(0, seq, (g * raw) ** 2)
                per_r = torch.zeros(num_seqs, device=x.device).index_add_(0, seq, raw ** 2)
                n = torch.zeros(num_seqs, device=x.device).index_add_(0, seq, torch.ones_like(g))
                g_sum = torch.zeros(num_seqs, device=x.device).index_add_(0, seq, g)
                self.acc[li, e] += torch.stack([n.sum(), per_w.sqrt().sum(), per_r.sqrt().sum(),
                                                (g_sum / n.clamp(min=1)).sum(), (n > 0).sum()]).double()

        return hook


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    args = ap.parse_args()

    from transformers import Gemma4ForCausalLM

    from moeprune.adapters import get_adapter
    from moeprune.prune.profile.stats import Accumulator, profiling

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma4ForCausalLM(gemma4_26b_config(args.layers, args.scale)).to(dtype).eval()
    randomize_(model)
    model.set_experts_implementation("grouped_mm")
    adapter = get_adapter("gemma4")
    blocks, decoder = adapter.moe_blocks(model), model.model
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), device=device)
    seq = torch.arange(args.batch, device=device).repeat_interleave(args.seq)
    tokens = ids.numel()
    acc = Accumulator(1, len(blocks), blocks[0].experts.num_experts, device)
    hook = HookProfiler(adapter, blocks, args.seq)

    def plain():
        return decoder(input_ids=ids, use_cache=False).last_hidden_state

    def moeprune():
        with profiling(blocks, adapter, acc):
            acc.begin(0, 1.0, seq, args.batch)
            return decoder(input_ids=ids, use_cache=False).last_hidden_state

    def hooked():
        with hook:
            return decoder(input_ids=ids, use_cache=False).last_hidden_state

    runs = {"plain": plain, "moeprune": moeprune, "hook": hooked}
    with torch.no_grad():
        outs = {name: fn() for name, fn in runs.items()}  # warm-up, and the checks below
        acc.sums.zero_()
        hook.acc.zero_()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved, so drift hits every variant alike
            for name, fn in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {args.layers} layers, {args.batch}x{args.seq} tokens, "
          f"{dtype}; median of {args.reps}")
    for k in runs:
        print(f"{k:9s} {rate[k]:>10.0f} tokens/s  {rate[k] / rate['plain']:.2f}x plain")
    same = torch.equal(outs["plain"], outs["moeprune"])
    ours = acc.sums[0][..., [0, 4, 5, 6, 7]]  # count, wnorm, rnorm, wsum, hits
    rel = ((ours - hook.acc).abs() / hook.acc.abs().clamp(min=1e-12)).max().item()
    print(f"outputs with profiling identical to plain: {same}; max relative difference of the statistics "
          f"moeprune vs hook: {rel:.2e}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
