"""The GGUF tier table: size, bits per weight and toy-suite accuracy per tier, scored THROUGH the GGUF.

    python benchmarks/quant_ladder.py [--model PATH] [--tiers f16,q8_0,...] [--n-per-class 50] [--out table.md]

Runs the real CLI once per tier with one shared cache, so the profile, drop map, pruned checkpoint,
F16 conversion and imatrix are computed once and each tier pays only for llama-quantize and its
evaluation (llama-server from the toolchain). The pruned HF checkpoint's own score (transformers)
is the first row. Every number is read back from the stages' artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TIERS = "f16,q8_0,q6_k,q5_k_m,q4_k_m,iq4_xs,q3_k_m,iq3_xxs,cd_q6_k,cd_q4_k_m,cd_q3_k_m"


def run_tier(tier: str, args, cache: Path, work: Path) -> dict:
    run_dir = work / tier
    cmd = [sys.executable, "-m", "moeprune", f"hydra.run.dir={run_dir}", f"quant_tier={tier}",
           f"bench.n_per_class={args.n_per_class}", "stages.evaluate_base=false", *args.overrides]
    if args.model:
        cmd.append(f"model.path={args.model}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MOEPRUNE_CACHE": str(cache)})
    if proc.returncode != 0:
        raise SystemExit(f"{tier}: moeprune failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    quant = Path(stages["quant"]["artifact"])
    samples = Path(stages["evaluate_quant"]["artifact"]) / "samples.jsonl"
    prompts = [json.loads(line)["prompt"] for line in samples.read_text().splitlines()]
    return {"tier": tier, "manifest": json.loads((quant / "quant-manifest.json").read_text()),
            "score": stages["evaluate_quant"], "hf": stages["evaluate"], "prompts": prompts,
            "profile": stages["profile"]["key"], "prune": stages["prune"]["key"]}


def table(rows: list[dict]) -> str:
    hf, params = rows[0]["hf"], rows[0]["manifest"]["parameters"]
    out = ["| tier | llama.cpp type | imatrix | size (bytes) | bpw | toy_suite (GGUF) | fallbacks |",
           "|---|---|---|---:|---:|---:|---:|",
           f"| pruned HF checkpoint (transformers) | - | - | {hf['size_bytes']:,} | {8 * hf['size_bytes'] / params:.2f} | "
           f"{100 * hf['score']:.1f}% ± {100 * hf['stderr']:.1f} | - |"]
    for r in rows:
        m, s = r["manifest"], r["score"]
        out.append(f"| {r['tier']} | {m['type']} | {'yes' if m['imatrix'] else 'no'} | {m['size_bytes']:,} | "
                   f"{m['bits_per_weight']:.2f} | {100 * s['score']:.1f}% ± {100 * s['stderr']:.1f} | "
                   f"{len(m['fallbacks'])} |")
    n = rows[0]["score"]["n"]
    out.append(f"\n{n} toy_suite problems per tier (greedy); parameters {rows[0]['manifest']['parameters']:,}.")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the config's model, the toy model)")
    p.add_argument("--tiers", default=DEFAULT_TIERS)
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=None, help="shared stage cache (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. keep.experts_per_layer=12")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        rows = [run_tier(t, args, cache, Path(tmp)) for t in args.tiers.split(",")]
        # One table compares one pruned checkpoint on one problem set: refuse it if either moved
        # during the run (the code or data under it was edited meanwhile).
        for r in rows[1:]:
            for key in ("prompts", "profile", "prune"):
                if r[key] != rows[0][key]:
                    raise SystemExit(f"{r['tier']}: its {key} differs from {rows[0]['tier']}'s; "
                                     "something changed during the run, run it again")
        rows_fallbacks = {r["tier"]: r["manifest"]["fallbacks"] for r in rows}
    text = table(rows)
    print(text)
    print("\nfallbacks per tier:", json.dumps({t: sorted(f) for t, f in rows_fallbacks.items()}, indent=1))
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
