"""Hydra override syntax -> Optuna distributions, and sampled values -> override strings.

    choice(a,b,c) or a,b,c          CategoricalDistribution([a, b, c])
    range(lo, hi) / range(lo,hi,s)  IntDistribution(lo, hi, step) -- hi INCLUDED, as in the official
                                    Optuna sweeper (a float bound or step gives a FloatDistribution)
    interval(lo, hi)                FloatDistribution(lo, hi); int(interval(lo, hi)) -> IntDistribution
    tag(log, interval(lo, hi))      the same on a log scale
    anything else                   a fixed value passed to every trial unchanged
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from moeprune.errors import MoePruneError


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution]  # optuna param name (the config key) -> distribution
    prefixes: dict[str, str]  # param name -> its override prefix ("", "+", "++")
    fixed: list[str]  # overrides every trial gets unchanged
    lines: dict[str, str] = field(default_factory=dict)  # param name -> its sweep as written (messages)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        swept = [f"{self.prefixes[k]}{k}={Transformer.str(v)}" for k, v in params.items()]
        return [*self.fixed, *swept]


def _prefix(override: Override) -> str:
    return {"ADD": "+", "FORCE_ADD": "++"}.get(override.type.name, "")


def distribution(override: Override) -> BaseDistribution:
    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep():
        if override.value_type.name == "GLOB_CHOICE_SWEEP":
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
        else:
            assert isinstance(value, ChoiceSweep)
            choices = [Transformer.encode(x) for x in value.list]
        if not choices:
            raise MoePruneError(f"search space {key}: choice() needs at least one value")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        if value.shuffle:  # shuffle(range(...)) is just an unordered set of values
            return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        lo, hi, step = value.start, value.stop, value.step
        if not (lo is not None and hi is not None and step and step > 0 and lo <= hi):
            raise MoePruneError(f"search space {key}: range({lo}, {hi}, step={step}) needs lo <= hi and step > 0")
        if all(isinstance(x, int) for x in (lo, hi, step)):
            return IntDistribution(lo, hi, step=step)
        return FloatDistribution(float(lo), float(hi), step=float(step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        lo, hi, log = value.start, value.end, "log" in value.tags
        if not lo < hi or (log and lo <= 0):
            raise MoePruneError(f"search space {key}: interval({lo}, {hi}) needs lo < hi"
                                + (" and lo > 0 on a log scale" if log else ""))
        unknown = set(value.tags) - {"log"}
        if unknown:
            raise MoePruneError(f"search space {key}: unknown tag(s) {sorted(unknown)}; expected log")
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=log)
        return FloatDistribution(float(lo), float(hi), log=log)
    raise MoePruneError(f"search space {key}: {override.input_line!r} is not a sweep the Optuna sweeper supports; "
                        "expected choice(...), a,b,c, range(...) or interval(...)")


def _name(o: Override) -> str:
    return o.key_or_group if o.package is None else f"{o.key_or_group}@{o.package}"


def build(overrides: list[Override]) -> SearchSpace:
    """The last override of a key wins, so a command-line argument replaces the preset's params."""
    by_key = {_name(o): o for o in overrides}
    dists, prefixes, fixed, lines = {}, {}, [], {}
    for name, o in by_key.items():
        if o.is_sweep_override():
            dists[name], prefixes[name], lines[name] = distribution(o), _prefix(o), o.input_line
        else:
            fixed.append(f"{o.get_key_element()}={o.get_value_element_as_str()}")
    return SearchSpace(dists, prefixes, fixed, lines)


def _inside(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dist.low <= value <= dist.high


def enqueued_points(space: SearchSpace, points: list[dict]) -> list[dict[str, Any]]:
    """hydra.sweeper.enqueue checked against the space: every key swept, every value inside its
    distribution (a point outside the space would be a trial the study cannot reproduce)."""
    out = []
    for i, point in enumerate(points):
        if not isinstance(point, dict) or not point:
            raise MoePruneError(f"hydra.sweeper.enqueue[{i}]={point!r}: expected a mapping of swept keys to values")
        for key, value in point.items():
            where = f"hydra.sweeper.enqueue[{i}].{key}={value!r}"
            if key not in space.distributions:
                raise MoePruneError(f"{where}: {key} is not swept; expected one of {sorted(space.distributions)}")
            if not _inside(space.distributions[key], value):
                raise MoePruneError(f"{where} is outside its search space {space.distributions[key]}")
        out.append(dict(point))
    return out


def default_params(space: SearchSpace, config, choices: dict) -> dict[str, Any]:
    """The composed config's own value of every swept key (a group's default option for a group),
    checked to lie inside its distribution."""
    from omegaconf import OmegaConf

    out = {}
    for name, dist in space.distributions.items():
        if name in choices:
            value = choices[name]
        else:
            value = OmegaConf.select(config, name, default=None)
        if not _inside(dist, value):
            raise MoePruneError(f"enqueue_default: the default {name}={value!r} is outside its search space {dist}; "
                                "widen the space or set hydra.sweeper.enqueue_default=false")
        out[name] = value
    return out
