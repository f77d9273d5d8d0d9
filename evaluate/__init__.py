"""Benches, backends and scoring (installed as `moeprune.evaluate`); docs/evaluation.md."""

from __future__ import annotations


def build(node, **runtime):
    """Instantiate a bench or backend config node; a MoePruneError from its constructor is raised as
    itself (Hydra wraps it in an InstantiationException, which would print a traceback)."""
    import hydra
    from hydra.errors import InstantiationException

    from moeprune.errors import MoePruneError

    try:
        return hydra.utils.instantiate(node, _convert_="all", **runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, MoePruneError):
            raise e.__cause__ from None
        raise
