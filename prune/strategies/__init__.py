"""Drop-map strategies: one file per strategy, built from `conf/strategy/<name>.yaml` by `_target_`."""
