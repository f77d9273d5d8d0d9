"""The Optuna sweeper's parts in-process: override syntax -> distributions, storages, directions,
job returns -> trial values, and the hparams_search presets composing against the schema."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import moeprune.cli  # noqa: F401  (registers schema, resolvers and the sweeper plugin)
from hydra_plugins.moeprune_optuna_sweeper import _core, _search_space
from moeprune.errors import MoePruneError
from tests.conftest import REPO


def parse(*lines: str):
    return OverridesParser.create().parse_overrides(list(lines))


@pytest.mark.parametrize("line, expected", [
    ("a=choice(max, mean)", CategoricalDistribution(["max", "mean"])),
    ("a=max,mean,sum", CategoricalDistribution(["max", "mean", "sum"])),
    ("a=choice(1, 2.5, true)", CategoricalDistribution([1, 2.5, True])),
    ("a=range(0, 3)", IntDistribution(0, 3)),  # upper bound included, as in the official plugin
    ("a=range(8, 16, 2)", IntDistribution(8, 16, step=2)),
    ("a=range(0.5, 2.0, 0.5)", FloatDistribution(0.5, 2.0, step=0.5)),
    ("a=interval(0.5, 4)", FloatDistribution(0.5, 4.0)),
    ("a=int(interval(2, 9))", IntDistribution(2, 9)),
    ("a=tag(log, interval(0.001, 1))", FloatDistribution(0.001, 1.0, log=True)),
])
def test_override_syntax_maps_to_optuna_distributions(line, expected):
    assert _search_space.distribution(parse(line)[0]) == expected


@pytest.mark.parametrize("line, message", [
    ("a=range(5, 2)", "needs lo <= hi"),
    ("a=interval(3, 1)", "needs lo < hi"),
    ("a=tag(log, interval(0, 1))", "lo > 0 on a log scale"),
    ("a=tag(sqrt, interval(1, 2))", "unknown tag(s) ['sqrt']"),
])
def test_bad_search_spaces_name_the_key(line, message):
    with pytest.raises(MoePruneError, match="search space a") as e:
        _search_space.distribution(parse(line)[0])
    assert message in str(e.value)


def test_build_splits_swept_and_fixed_and_the_command_line_wins():
    space = _search_space.build(parse("strategy.alpha=interval(0.5, 4)", "keep.drop_fraction=0.25",
                                      "+class_weights.weights.generic_code=choice(1.0, 3.0)",
                                      "strategy.alpha=interval(1, 2)"))
    assert space.distributions["strategy.alpha"] == FloatDistribution(1.0, 2.0)
    assert space.fixed == ["keep.drop_fraction=0.25"]
    params = {"strategy.alpha": 1.5, "class_weights.weights.generic_code": 3.0}
    assert space.overrides(params) == ["keep.drop_fraction=0.25", "strategy.alpha=1.5",
                                       "+class_weights.weights.generic_code=3.0"]


def test_default_params_come_from_the_config_and_must_lie_in_the_space():
    cfg = OmegaConf.create({"strategy": {"alpha": 2.0}})
    space = _search_space.build(parse("strategy=choice(max, mean)", "strategy.alpha=interval(0.5, 4)"))
    assert _search_space.default_params(space, cfg, {"strategy": "max"}) == {"strategy": "max", "strategy.alpha": 2.0}
    with pytest.raises(MoePruneError, match="the default strategy='sum' is outside its search space"):
        _search_space.default_params(space, cfg, {"strategy": "sum"})


def test_enqueued_points_must_name_swept_keys_with_values_inside_the_space():
    space = _search_space.build(parse("strategy=choice(max, sum)", "strategy.breadth_bonus=interval(0.0, 1.0)"))
    point = {"strategy": "sum", "strategy.breadth_bonus": 0.0}  # the interval's bound is inside
    assert _search_space.enqueued_points(space, [point]) == [point]
    for bad, message in (({"strategy": "reap"}, r"enqueue\[0\]\.strategy='reap' is outside its search space"),
                         ({"strategy.alpha": 2.0}, r"enqueue\[0\]\.strategy\.alpha=2\.0: strategy\.alpha is not swept; "
                                                   r"expected one of \['strategy', 'strategy\.breadth_bonus'\]"),
                         ({"strategy.breadth_bonus": 1.5}, r"breadth_bonus=1\.5 is outside"),
                         ({}, "expected a mapping of swept keys to values")):
        with pytest.raises(MoePruneError, match=message):
            _search_space.enqueued_points(space, [bad])


def test_storages_and_directions(tmp_path):
    import optuna

    journal = _core.make_storage(f"journal:{tmp_path}/studies/s.journal")
    assert isinstance(journal, optuna.storages.JournalStorage) and (tmp_path / "studies").is_dir()
    rdb = _core.make_storage(f"sqlite:///{tmp_path}/db/s.db")
    assert isinstance(rdb, optuna.storages.RDBStorage)
    assert _core.make_storage(None) is None
    with pytest.raises(MoePruneError, match="expected null .* journal:<file>"):
        _core.make_storage(str(tmp_path / "s.db"))
    assert _core.parse_directions(["maximize", "minimize"]) == ["maximize", "minimize"]
    with pytest.raises(MoePruneError, match="expected minimize, maximize"):
        _core.parse_directions("max")


@pytest.mark.parametrize("status, value, n, ok", [
    (JobStatus.COMPLETED, 0.5, 1, [0.5]),
    (JobStatus.COMPLETED, [0.5, 12], 2, [0.5, 12.0]),
    (JobStatus.COMPLETED, None, 1, "expected 1 number(s)"),
    (JobStatus.COMPLETED, [0.5], 2, "expected 2 number(s)"),
    (JobStatus.COMPLETED, float("nan"), 1, "non-finite"),
    (JobStatus.FAILED, MoePruneError("keep too small"), 1, "MoePruneError: keep too small"),
])
def test_job_returns_become_trial_values_or_a_reason(status, value, n, ok):
    ret = JobReturn(status=status, _return_value=value)
    values, why = _core.trial_values(ret, n)
    if isinstance(ok, list):
        assert values == ok and why is None
    else:
        assert values is None and ok in why


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")))
def test_hparams_search_presets_compose_with_the_optuna_sweeper(preset):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("moeprune_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    assert sw.study_name == preset and sw.storage.startswith("sqlite:///")
    # every swept key exists in the schema, and every swept group option is a preset on disk
    space = _search_space.build(parse(*[f"{k}={v}" for k, v in sw.params.items()]))
    for key, dist in space.distributions.items():
        if "." in key:
            assert OmegaConf.select(cfg, key) is not None, key
        else:
            for option in dist.choices:
                with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
                    compose(config_name="run", overrides=[f"{key}={option}"])
    _search_space.enqueued_points(space, OmegaConf.to_container(sw.enqueue) if sw.get("enqueue") else [])
    metrics = cfg.optimized_metric if not isinstance(cfg.optimized_metric, str) else [cfg.optimized_metric]
    directions = sw.direction if not isinstance(sw.direction, str) else [sw.direction]
    assert len(metrics) == len(directions)


def test_objective_reads_nested_metrics_and_names_what_exists():
    from moeprune.cli import objective

    results = {"evaluate": {"score": 0.75, "per_category": {"generic_code": 0.5}, "bench": "toy_suite"},
               "dropmap": {"kept_total": 48}}
    assert objective(results, "evaluate.score") == 0.75
    assert objective(results, "evaluate.per_category.generic_code") == 0.5
    assert objective(results, ["evaluate.score", "dropmap.kept_total"]) == [0.75, 48.0]
    assert objective(results, "evaluate_quant.score") is None  # that stage did not run
    with pytest.raises(MoePruneError, match=r"evaluate.per_category has no 'generic_cod'; expected one of \['generic_code'\]"):
        objective(results, "evaluate.per_category.generic_cod")
    with pytest.raises(MoePruneError, match="expected a number"):
        objective(results, "evaluate.bench")


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.storage=studies.db", "hydra.sweeper.storage='studies.db': expected null (in memory)"),
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0: expected at least 1"),
])
def test_bad_sweeper_settings_end_like_any_moeprune_error(tmp_path, override, message):
    from sweep_support import moeprune

    proc = moeprune(["-m", "hparams_search=toy_recipe", override, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                    tmp_path, tmp_path / "cache", check=False)
    assert proc.returncode == 2 and f"moeprune: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr
