"""Config composition: every group composes, knobs override, bad input fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

import moeprune.cli  # noqa: F401  (registers the schema and the moeprune_pkg resolver)

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "calibration", "strategy", "class_weights", "floor_clamp", "quant_tier", "bench", "backend", "logger"]


def _compose(overrides=()):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


def test_default_composes_to_toy_world():
    cfg = _compose()
    assert cfg.model.name == "toy_gemma4"
    assert Path(cfg.model.path).name == "model" and "toy" in cfg.model.path
    assert cfg.strategy.name == "max" and cfg.strategy.normalize == "rank"
    assert cfg.keep.drop_fraction == 0.25


@pytest.mark.parametrize("group", GROUPS)
def test_every_preset_of_every_group_composes(group):
    presets = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert presets, f"conf/{group} has no presets"
    for name in presets:
        cfg = _compose([f"{group}={name}"])
        assert cfg[group].name == name, f"conf/{group}/{name}.yaml must set name: {name}"


def test_knob_override_and_type_check():
    assert _compose(["strategy.alpha=1.5"]).strategy.alpha == 1.5
    assert _compose(["keep.experts_per_layer=12"]).keep.experts_per_layer == 12
    with pytest.raises((ValidationError, ConfigCompositionException)):
        _compose(["strategy.alpha=abc"])
    with pytest.raises((ConfigKeyError, ConfigCompositionException)):
        _compose(["strategy.alhpa=1.0"])


def test_unknown_group_option_names_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["strategy=no_such_strategy"])
    assert "no_such_strategy" in str(e.value) and "max" in str(e.value)


def test_help_names_the_app_its_groups_and_subcommands():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "moeprune", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("moeprune: profile a Mixture-of-Experts model")
    assert "class_weights: " in out and "coder" in out and "moeprune compare" in out and "moeprune report" in out
