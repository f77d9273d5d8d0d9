"""Benches, backends and scoring (installed as `moeprune.evaluate`); docs/evaluation.md."""
