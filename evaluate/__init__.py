"""Benches, backends and scoring (installed as `moeprune.evaluate`); docs/evaluation.md."""

from moeprune.config import build  # noqa: F401  (benches and backends are built like every config node)
