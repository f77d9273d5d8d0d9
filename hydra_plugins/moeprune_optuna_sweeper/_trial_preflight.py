"""A sweep whose trials would all fail their run preflight is refused before the study exists.

Each job runs moeprune's preflight (moeprune/preflight.py) before its first stage; a fixed knob no
trial can run with (`keep.experts_per_layer=1` below the model's top_k, an `optimized_metric` with no
such stage) failed every trial one by one after the study was created. The probe trials of
`_choices` (every choice and both ends of every range) are composed as jobs and preflighted here;
if none passes, no trial can, and the first probe's error ends the command. One that passes is
enough: a swept value may legitimately fail for some trials, which the sweep records as FAIL.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moeprune.errors import MoePruneError

from ._choices import probes
from ._search_space import SearchSpace


def check(space: SearchSpace, loader, master: DictConfig, sweep_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from moeprune import preflight

    first, saved = None, HydraConfig.instance().cfg
    try:
        for params in probes(space) or [{}]:
            cfg = loader.load_sweep_config(master, space.overrides(params))
            HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.cwd} resolves as in the job
            try:
                preflight.check_run(cfg, sweep_dir / "preflight-probe")  # checks paths, writes nothing
            except MoePruneError as e:
                first = first or e
                continue
            return
    finally:
        HydraConfig.instance().cfg = saved
    raise MoePruneError(f"no trial of this sweep can run: {first}") from None
