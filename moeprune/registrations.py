"""What the Hydra app needs registered before it composes: the run schema and the component
schemas (ConfigStore), the resolvers (`${moeprune_pkg:...}`, `${moeprune_gpus:}` ...) and the Optuna
sweeper's config group (`hydra/sweeper=optuna`). The CLI calls `register()` at import; so does every
composition helper (moeprune/presets.py), so that reading a preset never needs the CLI imported first.
Registering twice is harmless: ConfigStore replaces, resolvers are checked.

The sweeper's class is registered with Hydra's plugin registry by the CLI alone (`register_sweeper`
there): only the app launches a sweep, and the class reaches the sweep loop, which preflights
trials through moeprune.preflight, the stages and so these presets: registering it from here would
close that loop into an import cycle."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

import moeprune
from hydra_plugins.moeprune_optuna_sweeper import config as sweeper_config
from moeprune import config, gpu_slots

PKG_DIR = Path(moeprune.__file__).resolve().parent
_done = False


def register() -> None:
    global _done
    if _done:
        return
    if not OmegaConf.has_resolver("moeprune_pkg"):
        # `${moeprune_pkg:toy/model}` -> a path inside the installed package (the embedded toy model).
        OmegaConf.register_new_resolver("moeprune_pkg", lambda rel="": str(PKG_DIR / rel))
    config.register()
    gpu_slots.register_resolvers()  # ${moeprune_gpus:} / ${moeprune_n_gpus:} for hydra/launcher=joblib
    sweeper_config.register()  # hydra/sweeper=optuna and its samplers compose
    _done = True
