"""Every choice of the search space composes, checked before the study is created.

A trial whose overrides do not compose (a preset the group lacks, a knob the chosen component does
not have, an enum value outside its choices, a misspelt key) would fail inside the launcher after
the study exists. Instead a few probe trials are composed first, with the loader the jobs use,
through the CLI's own check (moeprune/overrides.py): together they take every categorical choice and
both ends of every numeric range, the i-th choice of every key in the i-th probe, so a knob one
option of a swept group lacks meets that option. Each probe is a trial the sampler could ask.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from optuna.distributions import CategoricalDistribution

from moeprune import overrides

from ._search_space import SearchSpace


def probes(space: SearchSpace) -> list[dict[str, Any]]:
    values = {name: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
              for name, d in space.distributions.items()}
    n = max((len(v) for v in values.values()), default=0)
    return [{name: v[i % len(v)] for name, v in values.items()} for i in range(n)]


def check(space: SearchSpace, loader, master: DictConfig) -> None:
    """Raise MoePruneError naming the sweep (as written) of the first probe that does not compose."""
    presets = None if master.hydra.searchpath else overrides.presets_of(loader)  # else the loader lacks some
    for params in probes(space):
        trial = space.overrides(params)
        swept = trial[len(space.fixed):]  # in params order (SearchSpace.overrides)
        shown = {o: f"search space {space.lines.get(name, o)}" for name, o in zip(params, swept)}
        overrides.verify(trial, lambda o: loader.load_sweep_config(master, list(o)), presets, shown)
