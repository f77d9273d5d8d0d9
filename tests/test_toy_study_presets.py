"""The toy study presets profile as the docs recommend (calibration.score_tokens=completion), and
toy_coder_4of16 is one budget of benchmarks/budget_curve.py: the same enqueued rows, the same space."""

from __future__ import annotations

import sys

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

import moeprune.cli  # noqa: F401  (registers the config schema and the sweeper plugin)
from hydra_plugins.moeprune_optuna_sweeper import _search_space
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import budget_curve as bc  # noqa: E402

TOY_STUDIES = sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("toy_*.yaml"))
# the sweeper's key for each of the benchmark's point keys
KEYS = {"strategy": "strategy", "score": "strategy.score", "normalize": "strategy.normalize",
        "alpha": "strategy.alpha", "protect_top": "strategy.protect_top", "breadth_bonus": "strategy.breadth_bonus",
        "class_weights": "class_weights", "floor_clamp": "floor_clamp", "shared_ffn_alpha": "prune.shared_ffn_alpha"}


def _compose(name: str):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        return compose(config_name="run", overrides=[f"hparams_search={name}"], return_hydra_config=True)


@pytest.mark.parametrize("name", TOY_STUDIES)
def test_every_toy_study_preset_profiles_only_the_answer_producing_positions(name):
    cfg = _compose(name)
    assert cfg.calibration.name == "toy" and cfg.calibration.score_tokens == "completion", \
        f"hparams_search={name} profiles with score_tokens={cfg.calibration.score_tokens} (docs/recipes.md: completion)"


def test_the_4of16_preset_enqueues_every_row_of_the_budget_curve_in_its_order_after_the_default():
    cfg = _compose("toy_coder_4of16")
    assert cfg.keep.experts_per_layer == 4 and cfg.hydra.sweeper.enqueue_default
    rows = list(bc.ROWS.values())
    default = {KEYS[k]: v for k, v in rows[0].items()}  # max-uniform: the composed config's own values
    for key, value in default.items():
        got = cfg.hydra.runtime.choices.get(key) if key in ("class_weights", "floor_clamp", "strategy") else \
            yaml.safe_load(str(eval_key(cfg, key)))
        assert got == value, (key, got, value)
    enqueued = [dict(p) for p in cfg.hydra.sweeper.enqueue]
    assert enqueued == [{KEYS[k]: v for k, v in p.items()} for p in rows[1:]]
    assert cfg.hydra.sweeper.sampler.n_startup_trials == len(rows) + 10


def test_the_4of16_preset_searches_the_benchmarks_space():
    params = _compose("toy_coder_4of16").hydra.sweeper.params
    space = _search_space.build(OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    bc.suggest(trial)
    assert {KEYS[k]: d for k, d in trial.distributions.items()} == space.distributions


def test_the_4of16_preset_reads_an_unknown_class_weights_option_as_a_different_space():
    # the comparison above can fail: a space without toy_lcb_only is not the benchmark's
    params = dict(_compose("toy_coder_8of16").hydra.sweeper.params)
    space = _search_space.build(OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    bc.suggest(trial)
    assert {KEYS[k]: d for k, d in trial.distributions.items()} != space.distributions


def eval_key(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node
