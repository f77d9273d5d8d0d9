"""Reading presets through Hydra: `preset(group, name)` is exactly what `group=name` composes to.

Only the run's glue (the stages, the CLI, the sweeper's checks) calls these; domain code under
prune/, quant/ and evaluate/ is handed the values (tests/test_package_layout.py holds it to that)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from omegaconf import OmegaConf

from moeprune import registrations
from moeprune.errors import MoePruneError


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's config loader: the running app's (its search path), else one over moeprune.conf."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
    else:
        registrations.register()  # the schemas, resolvers and sweeper config group the app composes with
        with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
            yield


def preset(group: str, name: str):
    """conf/<group>/<name>.yaml typed by its schema, exactly as `group=name` composes it."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException

    if name not in presets(group):
        raise MoePruneError(f"{group}={name}: no such preset; expected one of: {', '.join(presets(group))}")
    with _hydra():
        try:
            node = compose(config_name="run", overrides=[f"{group}={name}"])[group]
        except ConfigCompositionException as e:
            raise MoePruneError(f"{group}={name}: {e}") from None
    # on its own, as a loaded preset is: not part of that run config, nor closed by Hydra's struct flag
    return OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(node)), OmegaConf.to_container(node))


def presets(group: str) -> list[str]:
    """The presets of a config group, as `moeprune --help` lists them."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    with _hydra():
        loader = GlobalHydra.instance().config_loader()
        return sorted(loader.get_group_options(group, results_filter=ObjectType.CONFIG))


def class_weight_presets() -> dict[str, dict]:
    """Every class_weights preset as {name: weights}: what a recipe's unknown-class error offers."""
    return {name: dict(preset("class_weights", name).weights) for name in presets("class_weights")}


def quant_tier(name: str):
    """A quant_tier preset by name, typed by its kind's schema: what `quant_tier=<name>` composes to.
    Open to other keys, so that `tiers.validate` names another kind's knob merged into it, as the
    CLI does."""
    if name not in presets("quant_tier"):  # only this: a preset that exists but fails says why itself
        raise MoePruneError(f"unknown quant tier {name!r}; expected one of: {', '.join(presets('quant_tier'))}")
    tier = preset("quant_tier", name)
    OmegaConf.set_struct(tier, False)
    return tier
