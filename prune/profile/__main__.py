"""python -m moeprune.prune.profile: convert between moeprune profiles and the reference tool's JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.prune.profile.reference_json import export_reference, import_reference


def main(argv: list[str] | None = None) -> None:
    """python -m moeprune.prune.profile export PROFILE_DIR OUT.json | import [--top-k K] IN.json PROFILE_DIR"""
    ap = argparse.ArgumentParser(prog="python -m moeprune.prune.profile",
                                 description="convert between moeprune profiles and the reference tool's JSON "
                                             "(expert_neuron_*.json)")
    ap.add_argument("action", choices=("export", "import"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--top-k", type=int, default=None,
                    help="import: the model's routed experts per token, recorded so that `moeprune stage=dropmap "
                         "profile.path=DST` needs no model (the reference JSON does not say it)")
    args = ap.parse_args(argv)
    try:
        if args.action == "export":
            export_reference(args.src, args.dst)
        else:
            import_reference(args.src, args.dst, args.top_k)
    except MoePruneError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
