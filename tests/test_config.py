"""Config composition: every group composes, knobs override, bad input fails clearly."""

from __future__ import annotations

import re
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


# ---- per-component schemas: a knob belongs to the component that reads it ---------------------------
@pytest.mark.parametrize("overrides, message", [
    (["strategy=max", "strategy.seed=7"],
     "strategy.seed=7: strategy=max has no knob 'seed'; its knobs: normalize, protect_top, protect_class_top, "
     "rank_ties, alpha, score, breadth_bonus, outlier_mode, outlier_threshold"),
    (["strategy=reap", "strategy.alpha=9"],
     "strategy.alpha=9: strategy=reap has no knob 'alpha'; its knobs: normalize, protect_top, protect_class_top, "
     "rank_ties"),
    (["strategy=random", "strategy.breadth_bonus=1"], "strategy=random has no knob 'breadth_bonus'"),
    (["strategy=reap", "+strategy.seed=7"], "+strategy.seed=7: strategy=reap has no knob 'seed'"),  # appended
    (["bench=gsm8k_100", "bench.n_per_class=5"],
     "bench.n_per_class=5: bench=gsm8k_100 has no knob 'n_per_class'; its knobs: data, split, n, chat, prompt, "
     "max_new_tokens, thinking_budget, sampler, filter"),
    (["bench=gsm8k_100", "bench.sandbox.wall_s=3"], "bench=gsm8k_100 has no knob 'sandbox'"),
    (["bench=humaneval", "bench.languages=[rust]"], "bench=humaneval has no knob 'languages'"),
    (["backend=hf", "backend.base_url=http://x"], "backend.base_url=http://x: backend=hf has no knob 'base_url'; "
                                                  "its knobs: max_new_tokens, reasoning_start, reasoning_end, "
                                                  "enable_thinking, batch_size"),
    (["backend=openai", "backend.batch_size=4"], "backend=openai has no knob 'batch_size'"),
    (["backend=llama_cpp", "backend.base_url=http://x"], "backend=llama_cpp has no knob 'base_url'"),
    (["logger=none", "logger.project=p"], "logger.project=p: logger=none has no knob 'project'"),
    (["keep.foo=1"], "keep.foo=1: keep has no knob 'foo'; expected one of: experts_per_layer, drop_fraction"),
])
def test_a_knob_another_component_owns_is_refused_naming_the_component_and_its_knobs(overrides, message):
    from moeprune import overrides as cli_overrides
    from moeprune.errors import MoePruneError

    with pytest.raises(MoePruneError) as e:
        cli_overrides.check(overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("override, choices", [
    ("strategy.normalize=zscore", "[rank, mean, none]"),
    ("strategy.rank_ties=first", "[stable, min]"),
    ("strategy.score=sum", "[legacy, mean, reap, frequency, gate_mass]"),
    ("strategy.outlier_mode=clip", "[keep, median, drop, zero]"),
    ("keep.mode=greedy", "[uniform, budget]"),
    ("profile.mode=fast", "[auto, whole, layerwise]"),
    ("profile.on_nonfinite=warn", "[error, skip]"),
    ("prune.mtp_heads=prune", "[keep, drop]"),
    ("quant_tier.kind=awq", "[none, gguf, nvfp4]"),
    ("model.dtype=float8", "[float32, bfloat16, float16]"),
    ("calibration.score_tokens=some", "[all, completion]"),
])
def test_enum_valued_knobs_refuse_other_values_when_the_config_composes(override, choices):
    from moeprune import overrides as cli_overrides
    from moeprune.errors import MoePruneError

    value = override.split("=")[1]
    with pytest.raises(MoePruneError, match=re.escape(f"{override}: Invalid value '{value}', expected one of {choices}")):
        cli_overrides.check([override])
    assert _compose([override.split("=")[0] + "=" + choices[1:].split(",")[0].rstrip("]")])  # a listed value composes


def test_the_logger_mode_is_typed_too():
    from moeprune import overrides as cli_overrides
    from moeprune.errors import MoePruneError

    with pytest.raises(MoePruneError, match=r"Invalid value 'sometimes', expected one of \[offline, online, disabled\]"):
        cli_overrides.check(["logger=wandb", "logger.mode=sometimes"])


def test_every_preset_builds_with_the_knobs_its_schema_gives_it():
    from moeprune.config import build

    for name in sorted(p.stem for p in (CONF / "strategy").glob("*.yaml")):
        assert build(_compose([f"strategy={name}"]).strategy).name == name
    for name in ("toy_suite", "gsm8k_100", "gpqa_diamond", "lcb_medium_55", "humaneval"):
        assert build(_compose([f"bench={name}"]).bench).name == name


def test_the_three_misplaced_knobs_exit_2_through_the_cli_before_any_work():
    import subprocess
    import sys

    for args in (["strategy=max", "strategy.seed=7"], ["strategy=reap", "strategy.alpha=9"],
                 ["bench=gsm8k_100", "bench.n_per_class=5"]):
        proc = subprocess.run([sys.executable, "-m", "moeprune", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        knob = args[1].split("=")[0].split(".")[1]
        assert proc.stderr.startswith(f"moeprune: error: {args[1]}: {args[0]} has no knob {knob!r}; its knobs: ")
        assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("override, group", [("strategy=maxx", "strategy"), ("recipe=v7_coderz", "recipe"),
                                             ("hparams_search=toy", "hparams_search")],
                         ids=["a group every run has", "an optional group", "the sweep presets"])
def test_a_missing_preset_is_refused_naming_the_group_and_its_presets(override, group):
    from moeprune import overrides as cli_overrides
    from moeprune.errors import MoePruneError

    presets = ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
    with pytest.raises(MoePruneError) as e:  # an optional group would be skipped silently by Hydra
        cli_overrides.check([override])
    assert str(e.value) == f"{override}: no such preset; expected one of: {presets}"


@pytest.mark.parametrize("target, knob", [("hf.HFBackend", "base_url"), ("openai.OpenAIBackend", "batch_size"),
                                          ("llama_cpp.LlamaCppBackend", "api_key_env")])
def test_a_backend_built_with_another_backends_knob_is_refused(target, knob, tmp_path):
    from hydra.utils import get_class

    cls = get_class(f"moeprune.evaluate.backends.{target}")
    runtime = {"model_dir": tmp_path} if "model_dir" in cls.runtime else {}
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{knob}'"):
        cls(**runtime, **{knob: 1})
    if not runtime:  # nor the run values it does not take
        with pytest.raises(TypeError, match="unexpected keyword argument 'model_dir'"):
            cls(model_dir=tmp_path)
