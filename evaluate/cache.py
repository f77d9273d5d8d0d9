"""The generation cache: one sqlite file of completions keyed by (backend identity, generation
settings, prompt). A run writes each batch as it finishes, so a run killed mid-way resumes with
only the missing prompts; a finished run re-scored (new scorer, new audit) generates nothing.
sqlite's own locking lets parallel sweep jobs share the file."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.evaluate.types import Completion


class GenerationCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer of another job
            self.db.execute("CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, completion TEXT NOT NULL)")
            self.db.commit()
        except sqlite3.DatabaseError as e:
            self.db.close()
            if not existed:  # a file this call created and could not finish is no cache
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            if artifacts.out_of_space(e):
                raise MoePruneError(f"{self.path}: {e}: expected free space under paths.cache_dir for the generation "
                                    "cache (or evaluate.resume=false, which keeps none)") from None
            raise MoePruneError(f"{self.path} is not a usable generation cache ({e}): expected an sqlite file "
                                "moeprune wrote; delete it (its completions are regenerated) or run with "
                                "evaluate.resume=false") from None

    @classmethod
    def check(cls, path: Path) -> None:
        """Open (or create) the cache once before any stage runs: a corrupt file fails here."""
        cls(path).close()

    @staticmethod
    def key(identity: dict, settings: dict, prompt: str) -> str:
        return artifacts.hash_json({"identity": identity, "settings": settings, "prompt": prompt})

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        out = {}
        for start in range(0, len(keys), 500):  # sqlite caps the number of bound parameters
            chunk = keys[start:start + 500]
            rows = self.db.execute(f"SELECT key, completion FROM generations WHERE key IN ({','.join('?' * len(chunk))})",
                                   chunk).fetchall()
            out.update({k: Completion(**json.loads(v)) for k, v in rows})
        return out

    def put_many(self, items: dict[str, Completion]) -> None:
        try:
            with self.db:  # one transaction: a batch is stored whole or not at all
                self.db.executemany("INSERT OR REPLACE INTO generations VALUES (?, ?)",
                                    [(k, json.dumps(asdict(c))) for k, c in items.items()])
        except sqlite3.OperationalError as e:
            if not artifacts.out_of_space(e):
                raise
            raise MoePruneError(f"{self.path}: {e}: expected free space under paths.cache_dir; the batches stored "
                                "so far stay, and the same command resumes from them") from None

    def close(self) -> None:
        self.db.close()
