"""moeprune's Optuna sweeper for Hydra (`hydra/sweeper=optuna`); see docs/sweeps.md."""


def register() -> None:
    """Register the sweeper with Hydra explicitly. Hydra finds plugins by a pkgutil scan of
    `hydra_plugins`, which cannot see into setuptools' editable installs (`pip install -e .`), so
    the `moeprune` entrypoint registers it instead of relying on the scan."""
    from hydra.core.plugins import Plugins

    from .optuna_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)
