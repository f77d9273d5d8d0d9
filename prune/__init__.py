"""Profiling, drop maps and surgery (installed as `moeprune.prune`)."""
