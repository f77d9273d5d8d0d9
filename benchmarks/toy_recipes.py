"""Per-class accuracy of drop-map recipes on the trained toy model, 25% of experts dropped per layer.

Each recipe's map is scored on the held-out test split with virtual pruning (the dropped experts'
router logits at -inf: the pruned checkpoint's routing, no checkpoint written), from two profiles:

- `prompt+answer`: the toy calibration with `calibration.score_tokens=all`, every position of each
  teacher-forced calibration task counted (the reference's way);
- `completion`: only the positions that produce the answer (the last prompt token onwards), i.e.
  what generation exercises — the reference profiles prompt + 128 generated tokens, so its profile
  is dominated by generation. Computed with the pipeline's own profile stage as
  profile(prompt + answer) - profile(prompt minus its last token): causal attention routes every
  context token identically in both, so the additive statistics (count, gate_sum, contrib_sum,
  out_norm_sum) subtract exactly. wnorm (a per-pass norm) does not, so the reference score runs
  with alpha = 0 (its count term) on this profile.

Prints markdown tables (docs/recipes.md) and writes them with the raw numbers to --out.

    python benchmarks/toy_recipes.py [--n 300] [--out outputs/bench/toy_recipes]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from moeprune.registrations import PKG_DIR, register
from moeprune.adapters import adapter_for
from moeprune.evaluate.backends.hf import HFBackend
from moeprune.evaluate.benches.toy_suite import ToySuite
from moeprune.evaluate.bench_run import run_bench
from moeprune.models import load_model, load_tokenizer, read_config
from moeprune.prune import recipe as dropmap
from moeprune.dropmap import DropMap
from moeprune.profile import Profile
from moeprune.runner import Runner
from moeprune.stages import STAGES
from moeprune.toy import world

register()  # the config schema and resolvers, before anything composes

TARGETED = "code-targeted"
RECIPES = {  # the comparison: two single-criterion baselines, max-uniform, weight 3 on code
    "frequency": ["strategy=frequency"],
    "reap": ["strategy=reap"],
    "max-uniform": ["strategy=max", "class_weights=uniform"],
    TARGETED: ["recipe=toy_coder"],
}
ADDITIVE = ("count", "gate_sum", "contrib_sum", "out_norm_sum")


def compose_cfg(model: Path, out: Path, overrides: list[str]):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        return compose(config_name="run", overrides=[
            f"model.path={model}", "keep.drop_fraction=0.25", f"paths.output_dir={out / 'run'}",
            f"paths.cache_dir={out / 'cache'}", *overrides])


def pipeline_profile(model: Path, out: Path, overrides: list[str], score_tokens: str = "all") -> Profile:
    """The profile stage; by default with every position counted (the subtraction below needs whole
    passes), `score_tokens="completion"` for the toy default (answer-producing positions only)."""
    (out / "run").mkdir(parents=True, exist_ok=True)
    runner = Runner(compose_cfg(model, out, [f"calibration.score_tokens={score_tokens}", *overrides]), STAGES, out / "run")
    runner.run("profile")
    return Profile.load(runner.dirs["profile"])


def completion_profile(model: Path, out: Path, tok, full: Profile, n: int) -> Profile:
    """full minus a profile of the same calibration tasks cut before their last prompt token."""
    overrides = []
    for c in full.classes:
        lines = []
        for t in world.make_tasks(c, n, "calib", 0):  # the toy source's own tasks (seed 0)
            ids, ctx = tok(t.prompt + t.answer)["input_ids"], tok(t.prompt[:-1])["input_ids"]
            if ids[:len(ctx)] != ctx:  # the subtraction is exact only for a token prefix
                raise SystemExit(f"{c}: {t.prompt[:-1]!r} does not tokenize to a prefix of {t.prompt + t.answer!r}")
            lines.append(t.prompt[:-1])
        path = out / "context" / f"{c}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        overrides.append(f"calibration.classes.{c}=[{{kind:text,path:{path.resolve()}}}]")
    ctx = pipeline_profile(model, out, [f"calibration.samples_per_class={n}", *overrides])  # the same n tasks
    stats = {k: (full[k] - ctx[k]).clamp(min=0) for k in ADDITIVE}  # clamp: float rounding only
    tokens = {c: full.tokens[c] - ctx.tokens[c] for c in full.classes}
    return Profile(full.classes, full.layers, full.num_experts, stats, tokens, {"source": "completion"})


def table(results: dict, names: list[str]) -> str:
    base = results["base"]
    lines = ["| class | base | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for c in list(base["per_category"]) + ["ALL"]:
        b = base["per_category"][c] if c != "ALL" else base["score"]
        cells = [results[k]["per_category"][c] if c != "ALL" else results[k]["score"] for k in names]
        lines.append(f"| {c} | {100 * b:.1f} | " + " | ".join(f"{100 * v:.1f} ({100 * (v - b):+.1f})" for v in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(PKG_DIR / "toy" / "model"))
    ap.add_argument("--n", type=int, default=300, help="test tasks per class")
    ap.add_argument("--calib", type=int, default=64, help="calibration tasks per class")
    ap.add_argument("--out", default="outputs/bench/toy_recipes")
    args = ap.parse_args()
    model_dir, out = Path(args.model), Path(args.out)
    config = read_config(model_dir)
    top_k = adapter_for(config).top_k(config)
    model, tok = load_model(model_dir, "float32", "cpu"), load_tokenizer(model_dir)

    t0 = time.perf_counter()
    full = pipeline_profile(model_dir, out, [f"calibration.samples_per_class={args.calib}"])
    profiles = {"prompt+answer": full, "completion": completion_profile(model_dir, out, tok, full, args.calib)}
    comp = profiles["completion"]
    share = {c: comp.tokens[c] / full.tokens[c] for c in full.classes}
    print(f"profiles ready in {time.perf_counter() - t0:.0f} s; completion share of each class's profiled tokens: "
          + ", ".join(f"{c} {100 * s:.0f}%" for c, s in share.items()))

    def evaluate(name: str, drop_map: DropMap | None) -> dict:
        backend = HFBackend(model_dir, drop_map=drop_map, model=model, tokenizer=tok, batch_size=256)
        return run_bench(ToySuite(n_per_class=args.n), backend, out / "eval" / name)

    results, maps = {"base": evaluate("base", None)}, {}
    for pname, profile in profiles.items():
        for rname, overrides in RECIPES.items():
            if pname == "completion" and rname in ("max-uniform", TARGETED):
                overrides = [*overrides, "strategy.alpha=0"]  # no wnorm in a completion profile
            key = f"{rname} @ {pname}"
            cfg = compose_cfg(model_dir, out, overrides)
            recipe = dropmap.Recipe.of(cfg.strategy, cfg.class_weights, cfg.floor_clamp, cfg.keep)
            maps[key] = dropmap.build(profile, recipe, top_k).as_json()
            results[key] = evaluate(key.replace(" @ ", "@").replace("+", "_"),
                                    DropMap.parse(maps[key], num_experts=profile.num_experts, top_k=top_k))
            print(f"{key}: {results[key]['score']:.3f}", flush=True)

    report, checks = [], {}
    for pname in profiles:
        names = [f"{r} @ {pname}" for r in RECIPES]
        report.append(f"profile: {pname}\n\n" + table(results, names).replace(f" @ {pname}", ""))
        code = {k: results[k]["per_category"]["generic_code"] for k in ["base", *names]}
        t = f"{TARGETED} @ {pname}"
        checks[pname] = {
            "targeted keeps >= 98% of base code accuracy": code[t] >= 0.98 * code["base"],
            "targeted >= frequency on code": code[t] >= code[f"frequency @ {pname}"],
            "targeted >= reap on code": code[t] >= code[f"reap @ {pname}"],
        }
    # why a class loses: the share of its completion routing that lands on the experts a map drops
    lost = ["| map | " + " | ".join(full.classes) + " |", "|" + "---|" * (len(full.classes) + 1)]
    count = comp["count"].double()
    for key, m in maps.items():
        cells = [100 * sum(float(count[ci, li, m[str(layer)]].sum()) for li, layer in enumerate(full.layers))
                 / float(count[ci].sum()) for ci in range(len(full.classes))]
        lost.append(f"| {key} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    text = "\n\n".join(report) + "\n\nshare of each class's completion routing on dropped experts (%):\n\n" + "\n".join(lost)
    print(text)
    for pname, cs in checks.items():
        for k, ok in cs.items():
            print(f"{'PASS' if ok else 'FAIL'}  [{pname}] {k}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({
        "n_per_class": args.n, "calib_per_class": args.calib, "completion_share": share, "checks": checks,
        "results": {k: {"score": v["score"], "per_category": v["per_category"]} for k, v in results.items()},
        "drop_maps": maps}, indent=2))


if __name__ == "__main__":
    main()
