"""Benches: one file each, built from `conf/bench/<name>.yaml` by `_target_`."""
