"""What the Hydra app needs registered before it composes: the run schema and the component
schemas (ConfigStore), the resolvers (`${moeprune_pkg:...}`, `${moeprune_gpus:}` ...) and the Optuna
sweeper plugin. The CLI calls `register()` at import; so does every composition helper
(moeprune/presets.py), so that reading a preset never needs the CLI imported first.
Registering twice is harmless: ConfigStore and the plugin registry replace, resolvers are checked."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

import moeprune
from hydra_plugins import moeprune_optuna_sweeper as sweeper_plugin
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
    sweeper_plugin.register()  # hydra/sweeper=optuna, also from an editable install (see the plugin)
    _done = True
