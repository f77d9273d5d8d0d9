"""`moeprune compare <A> [<B>]`: per-bench score deltas and the per-problem agreement matrix (both
right, both wrong, only A right, only B right), as the reference cards report base vs pruned.

A and B are evaluation artifact dirs (summary.json + samples.jsonl), run dirs (run.json: their
`evaluate` stage, else `evaluate_base`; `RUN:STAGE` picks one), or dirs holding several of either
(a multirun sweep: one bench per job). With one run dir, compares its evaluate_base with its
evaluate. Differences in bench settings or data between the two sides are printed as warnings:
scores computed under different settings are not comparable (the reference's "settings drift").
"""

from __future__ import annotations

import sys
from pathlib import Path

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.evaluate.bench_run import SAMPLES_FILE, SUMMARY_FILE, read_jsonl


def _eval_dirs(spec: str) -> dict[str, Path]:
    """bench name -> evaluation dir for one side of the comparison."""
    path, _, stage = spec.partition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    p = Path(path)
    if not p.is_dir():
        raise MoePruneError(f"compare: {p} is not a directory; expected a run dir or an evaluation dir")
    if (p / SUMMARY_FILE).is_file() and (p / SAMPLES_FILE).is_file():
        return {artifacts.read_json(p / SUMMARY_FILE)["bench"]: p}
    if (p / "run.json").is_file():
        stages = artifacts.read_json(p / "run.json")["stages"]
        names = [stage] if stage else [s for s in ("evaluate", "evaluate_base") if s in stages][:1]
        if not names or names[0] not in stages:
            raise MoePruneError(f"compare: {p} has no {stage or 'evaluate or evaluate_base'} stage; "
                                f"it ran {sorted(stages)}")
        return _eval_dirs(stages[names[0]]["artifact"])
    found: dict[str, Path] = {}
    for child in sorted(c for c in p.iterdir() if c.is_dir()):
        try:
            sub = _eval_dirs(f"{child}:{stage}" if stage else str(child))
        except MoePruneError:
            continue
        for bench, d in sub.items():
            if bench in found:
                raise MoePruneError(f"compare: bench {bench} appears twice under {p} ({found[bench]}, {d})")
            found[bench] = d
    if not found:
        raise MoePruneError(f"compare: no evaluation results under {p}")
    return found


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_bench(a_dir: Path, b_dir: Path) -> dict:
    sa, sb = artifacts.read_json(a_dir / SUMMARY_FILE), artifacts.read_json(b_dir / SUMMARY_FILE)
    for d, s in ((a_dir, sa), (b_dir, sb)):
        if s.get("metric"):  # bench=divergence: a distance per token, no problem passed or failed
            raise MoePruneError(f"compare: {d} holds bench={s['bench']} ({s['metric']} against the base model, "
                                "teacher-forced), which passes or fails no problem: expected the evaluations of "
                                "a generating bench (its summary.json holds the per-class figures)")
    ra = {r["id"]: r for r in read_jsonl(a_dir / SAMPLES_FILE)}
    rb = {r["id"]: r for r in read_jsonl(b_dir / SAMPLES_FILE)}
    common = [i for i in ra if i in rb]
    matrix = {"both_right": 0, "both_wrong": 0, "only_a": 0, "only_b": 0}
    for i in common:
        pa, pb = ra[i]["pass"], rb[i]["pass"]
        matrix["both_right" if pa and pb else "both_wrong" if not (pa or pb) else "only_a" if pa else "only_b"] += 1
    fa, fb = _flat(sa.get("settings", {}).get("bench")), _flat(sb.get("settings", {}).get("bench"))
    fa.update(_flat(sa.get("settings", {}).get("generation"), "generation."))
    fb.update(_flat(sb.get("settings", {}).get("generation"), "generation."))
    drift = {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
    if sa.get("data_hash") != sb.get("data_hash"):
        drift["data_hash"] = [sa.get("data_hash"), sb.get("data_hash")]
    cats = sorted(set(sa.get("per_category", {})) | set(sb.get("per_category", {})))
    return {
        "a": {"dir": str(a_dir), "score": sa["score"], "n": sa["n"], "stderr": sa.get("stderr")},
        "b": {"dir": str(b_dir), "score": sb["score"], "n": sb["n"], "stderr": sb.get("stderr")},
        "delta": sb["score"] - sa["score"],
        "per_category": {c: {"a": sa.get("per_category", {}).get(c), "b": sb.get("per_category", {}).get(c)}
                         for c in cats},
        "agreement": {**matrix, "common": len(common), "only_in_a": len(ra) - len(common),
                      "only_in_b": len(rb) - len(common)},
        "settings_drift": drift,
    }


def compare(a: str, b: str | None) -> dict:
    if b is None:
        a, b = f"{a}:evaluate_base", f"{a}:evaluate"
    da, db = _eval_dirs(a), _eval_dirs(b)
    shared = sorted(set(da) & set(db))
    if not shared:
        raise MoePruneError(f"compare: no bench in common: A has {sorted(da)}, B has {sorted(db)}")
    return {"a": a, "b": b, "benches": {name: compare_bench(da[name], db[name]) for name in shared},
            "only_in_a": sorted(set(da) - set(db)), "only_in_b": sorted(set(db) - set(da))}


def format_table(result: dict) -> str:
    lines = [f"A = {result['a']}", f"B = {result['b']}", ""]
    head = ("bench", "n", "A", "B", "delta pp", "both right", "both wrong", "only A", "only B")
    rows = [head]
    for name, r in result["benches"].items():
        m = r["agreement"]
        rows.append((name, str(m["common"]), f"{r['a']['score']:.2%}", f"{r['b']['score']:.2%}",
                     f"{r['delta'] * 100:+.2f}", str(m["both_right"]), str(m["both_wrong"]), str(m["only_a"]),
                     str(m["only_b"])))
        for cat, v in r["per_category"].items():
            if v["a"] is not None and v["b"] is not None:
                rows.append((f"  {cat}", "", f"{v['a']:.2%}", f"{v['b']:.2%}", f"{(v['b'] - v['a']) * 100:+.2f}",
                             "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    for name, r in result["benches"].items():
        for key, (va, vb) in r["settings_drift"].items():
            lines.append(f"WARNING {name}: settings differ, not comparable as is: {key}: A={va!r} B={vb!r}")
        if r["agreement"]["only_in_a"] or r["agreement"]["only_in_b"]:
            lines.append(f"WARNING {name}: problems only in A: {r['agreement']['only_in_a']}, "
                         f"only in B: {r['agreement']['only_in_b']}")
    for side in ("a", "b"):
        if result[f"only_in_{side}"]:
            lines.append(f"benches only in {side.upper()}: {', '.join(result[f'only_in_{side}'])}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from moeprune.cli_args import Parser

    ap = Parser(prog="moeprune compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", metavar="RUN_A", help="run dir, evaluation dir or sweep dir (RUN:STAGE picks a stage)")
    ap.add_argument("b", metavar="RUN_B", nargs="?", help="the same for B; omitted: A's evaluate_base vs its evaluate")
    ap.add_argument("--json", type=Path, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    try:
        result = compare(args.a, args.b)
    except MoePruneError as e:
        print(f"moeprune: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        artifacts.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
