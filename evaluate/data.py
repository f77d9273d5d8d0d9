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


def _check_json(path: Path, bench: str) -> None:
    """A local .json / .jsonl(.gz) bench file that is neither one JSON document nor JSON lines,
    named with the first bad line (datasets says only "An error occurred while generating the
    dataset" and logs pyarrow's reason on a line of its own)."""
    import gzip
    import json

    where = f"bench {bench}: data.path {path}"
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError) as e:
        raise MoePruneError(f"{where} cannot be read ({e}): expected a JSON / JSONL file") from None
    except UnicodeDecodeError as e:
        raise MoePruneError(f"{where} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): expected "
                            "UTF-8 JSON") from None
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as whole:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for n, line in lines:
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                if n == lines[0][0]:  # not JSON lines either: the whole document's error says more
                    raise MoePruneError(f"{where}:{whole.lineno} is not JSON ({whole.msg}, column {whole.colno}): "
                                        "expected one JSON document or one JSON object per line") from None
                raise MoePruneError(f"{where}:{n} is not JSON ({e.msg}, column {e.colno}): expected one JSON "
                                    "object per line (JSONL)") from None


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
        if builder == "json":
            _check_json(p, bench)  # the parser's words, with a line, before datasets buries them
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
