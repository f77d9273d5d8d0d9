"""Benches, backends and scoring (installed as `moeprune.evaluate`)."""
