"""Bench data: a Hugging Face dataset (id + config + revision, from the local `datasets` cache when
offline) or a local file in the dataset's own format (JSONL / JSON / parquet), read the same way.

Returns the rows as plain dicts plus a content hash that goes into the bench summary, so two scores
are comparable only when they were computed on the same data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moeprune import artifacts
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet"}


def load_rows(source: dict, split: str, bench: str) -> tuple[list[dict], str]:
    """(rows, data hash) for a bench's `data` config: {hf_id, config, revision, data_files, path}."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()  # one bar per local file read would drown the run's log
    path, hf_id = source.get("path"), source.get("hf_id")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MoePruneError(f"bench {bench}: data.path {p} does not exist; expected a JSONL / JSON / parquet file")
        builder = _LOCAL_BUILDERS.get(p.suffix)
        if builder is None:
            raise MoePruneError(f"bench {bench}: data.path {p}: expected a .jsonl, .json(.gz) or .parquet file")
        try:
            ds = load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:  # a malformed file: name it, with the parser's own words
            raise MoePruneError(f"bench {bench}: cannot read {p} as {builder}: {e}") from None
        return [dict(r) for r in ds], artifacts.hash_file(p)
    if not hf_id:
        raise MoePruneError(f"bench {bench}: no data source; set bench.data.hf_id or bench.data.path")
    try:
        ds = load_dataset(hf_id, name=source.get("config"), split=split, revision=source.get("revision"),
                          data_files=source.get("data_files"))
    except Exception as e:
        raise MoePruneError(
            f"bench {bench}: dataset {hf_id!r} (config {source.get('config')}, split {split}, revision "
            f"{source.get('revision')}) is not available: {type(e).__name__}: {str(e)[:300]}. Download it into the "
            f"Hugging Face cache where there is network, or point bench.data.path at a local copy"
        ) from None
    return [dict(r) for r in ds], artifacts.hash_json([hf_id, source.get("config"), split, ds._fingerprint])
