"""A sweep must not choose its best trial on the split that reported tables score.

The split a trial's bench scores is what the sweep optimizes on: `bench.split` as the search space
fixes or sweeps it, else the config's, else the bench's own default (`default_split`, `test` for
toy_suite; `all`, the whole set, for the dataset benches). A sweep whose objective reads the bench
and whose split is `test` or `all` (which holds the test half) is refused unless
`hydra.sweeper.allow_test_split=true` says it is meant.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from moeprune.errors import MoePruneError

from ._search_space import SearchSpace

REPORTED = ("test", "all")  # the splits reported tables score (all holds the test half)
KEY = "bench.split"


def _reads_the_bench(config: DictConfig) -> bool:
    metric = OmegaConf.select(config, "optimized_metric")
    metrics = [metric] if isinstance(metric, str) else list(metric or [])
    return any(str(m).split(".")[0].startswith("evaluate") for m in metrics)


def _default_split(config: DictConfig) -> Any:
    from hydra.utils import get_class

    target = OmegaConf.select(config, "bench._target_")
    try:
        return getattr(get_class(target), "default_split", None) if target else None
    except Exception:  # an unimportable bench fails in its trial, with its own message
        return None


def swept_splits(config: DictConfig, space: SearchSpace) -> list[tuple[str, Any]]:
    """Each split the trials may score, with where it comes from."""
    fixed = [f.split("=", 1)[1] for f in space.fixed if f.split("=", 1)[0].lstrip("+~") == KEY]
    if KEY in space.distributions:
        return [(f"{KEY}={c}", c) for c in getattr(space.distributions[KEY], "choices", ())]
    if fixed:
        return [(f"{KEY}={fixed[-1]}", fixed[-1])]
    split = OmegaConf.select(config, KEY)
    if split is not None:
        return [(f"{KEY}={split}", split)]
    name = OmegaConf.select(config, "bench.name")
    return [(f"{KEY}=null (the default split of bench {name})", _default_split(config))]


def check(config: DictConfig, space: SearchSpace, allow_test_split: bool) -> None:
    if allow_test_split or OmegaConf.select(config, "bench") is None or not _reads_the_bench(config):
        return
    for where, split in swept_splits(config, space):
        if split in REPORTED:
            raise MoePruneError(
                f"the sweep would choose its best trial on {where}, which holds the split reported tables score: "
                f"expected {KEY}=val (every bench has one: toy_suite's own, the others' half by task-id hash), or "
                f"hydra.sweeper.allow_test_split=true to optimize on it knowingly")
