"""A sweep whose trials could not compose stops before its study exists: exit 2, one
`moeprune: error:` line naming the override or the search space as written, no study in the storage."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import moeprune.cli  # noqa: F401  (registers schema, resolvers and the sweeper plugin)
from hydra_plugins.moeprune_optuna_sweeper import _choices, _search_space
from moeprune.errors import MoePruneError
from tests.conftest import REPO

CLASS_WEIGHTS = ", ".join(sorted(p.stem for p in (REPO / "conf" / "class_weights").glob("*.yaml")))
STRATEGY_MAX_KNOBS = ("normalize, protect_top, protect_class_top, rank_ties, alpha, score, breadth_bonus, "
                      "outlier_mode, outlier_threshold")


def sweep(tmp_path: Path, *args: str):
    from sweep_support import moeprune

    return moeprune(["-m", *args, "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{tmp_path}/s.db",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, tmp_path / "cache", check=False)


def assert_refused(proc, tmp_path: Path, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moeprune: error:")]
    assert errors == [f"moeprune: error: {message}"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "sweep").exists()
    assert not (tmp_path / "s.db").exists()  # the storage was never opened: no study, not even an empty one


@pytest.mark.parametrize("args, message", [
    (["strategy.seed=7"], f"strategy.seed=7: strategy=max has no knob 'seed'; its knobs: {STRATEGY_MAX_KNOBS}"),
    (["strategy.normalize=zscore"],
     "strategy.normalize=zscore: Invalid value 'zscore', expected one of [rank, mean, none]"),
    (["class_weights=choice(uniform,nosuch)"],
     "search space class_weights=choice(uniform,nosuch): no such preset class_weights=nosuch; expected one of: "
     f"{CLASS_WEIGHTS}"),
    (["strategy.alhpa=interval(0.5,4)"],
     f"search space strategy.alhpa=interval(0.5,4): strategy=max has no knob 'alhpa'; its knobs: {STRATEGY_MAX_KNOBS}"),
    (["strategy.normalize=choice(rank,zscore)"],
     "search space strategy.normalize=choice(rank,zscore): Invalid value 'zscore', expected one of [rank, mean, none]"),
    # reap is one option of the swept strategy; the preset also sweeps score, a class-aggregate knob
    (["strategy=choice(max,reap)"],
     "search space strategy.score=choice(legacy, mean, reap, frequency, gate_mass): strategy=reap has no knob "
     "'score'; its knobs: normalize, protect_top, protect_class_top, rank_ties"),
    (["strategy.protect_top=interval(0.5,2.5)"],
     "search space strategy.protect_top=interval(0.5,2.5): Value '0.5' of type 'float' could not be converted "
     "to Integer"),
], ids=["fixed knob another component owns", "fixed bad enum", "swept missing preset", "swept misspelt key",
        "swept bad enum", "swept knob one option lacks", "swept float into an int knob"])
def test_a_sweep_on_the_command_line_that_cannot_compose_stops_before_the_study(tmp_path, args, message):
    assert_refused(sweep(tmp_path, "hparams_search=toy_recipe", *args), tmp_path, message)




@pytest.mark.parametrize("line, message", [
    ("class_weights: choice(uniform, five_class, nosuch)",
     f"search space class_weights=choice(uniform, five_class, nosuch): no such preset class_weights=nosuch; "
     f"expected one of: {CLASS_WEIGHTS}"),
    ("strategy.alhpa: interval(0.5, 4.0)",  # before, enqueue_default was blamed for its missing default
     f"search space strategy.alhpa=interval(0.5, 4.0): strategy=max has no knob 'alhpa'; its knobs: "
     f"{STRATEGY_MAX_KNOBS}"),
], ids=["missing preset", "misspelt key"])
def test_a_preset_whose_search_space_cannot_compose_stops_before_the_study(tmp_path, line, message):
    conf = tmp_path / "conf" / "hparams_search"
    conf.mkdir(parents=True)
    preset = (REPO / "conf" / "hparams_search" / "toy_recipe.yaml").read_text()
    key = line.split(":")[0]
    kept = [p for p in preset.splitlines() if not p.strip().startswith(f"{key}:")]  # the preset's own sweep of key
    params = kept.index("    params:")
    (conf / "bad.yaml").write_text("\n".join([*kept[:params + 1], f"      {line}", *kept[params + 1:]]) + "\n")
    assert_refused(sweep(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "hparams_search=bad"),
                   tmp_path, message)


def test_a_missing_sweep_preset_is_named_not_skipped_as_an_optional_group(tmp_path):
    presets = ", ".join(sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")))
    assert_refused(sweep(tmp_path, "hparams_search=toy_recipe", "hparams_search=nosuch", "strategy.alpha=interval(1,2)"),
                   tmp_path, f"hparams_search=nosuch: no such preset; expected one of: {presets}")


def test_probes_take_every_choice_and_both_ends_of_every_range():
    space = _search_space.SearchSpace({"a": CategoricalDistribution(["x", "y", "z"]), "b": FloatDistribution(0.5, 4.0),
                                       "c": IntDistribution(0, 3)}, {"a": "", "b": "", "c": ""}, [])
    probes = _choices.probes(space)
    assert [p["a"] for p in probes] == ["x", "y", "z"]
    assert {p["b"] for p in probes} == {0.5, 4.0} and {p["c"] for p in probes} == {0, 3}


@contextlib.contextmanager
def space_of(preset: str, *sweeps: str):
    """The preset's search space (and `sweeps` from the command line), the loader and master config
    its sweeper gets."""
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("run", [f"hparams_search={preset}"], RunMode.MULTIRUN)
        lines = [f"{k}={v}" for k, v in master.hydra.sweeper.params.items()] + [f"hparams_search={preset}", *sweeps]
        yield _search_space.build(OverridesParser.create().parse_overrides(lines)), loader, master


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")))
def test_every_choice_of_every_sweep_preset_composes(preset):
    with space_of(preset) as (space, loader, master):
        _choices.check(space, loader, master)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")))
def test_every_sweep_presets_default_recipe_and_enqueued_points_lie_in_its_space(preset):
    from omegaconf import OmegaConf

    with space_of(preset) as (space, loader, master):
        sweeper = master.hydra.sweeper
        if sweeper.enqueue_default:  # trial 0 must be a point of the space (gemma4_98e's was not)
            _search_space.default_params(space, master, OmegaConf.to_container(master.hydra.runtime.choices))
        _search_space.enqueued_points(space, OmegaConf.to_container(sweeper.enqueue) if sweeper.enqueue else [])


def test_a_knob_of_one_option_of_a_swept_group_is_refused_in_process():
    with space_of("toy_recipe", "strategy=choice(max, random)", "strategy.seed=range(0, 3)") as (space, loader, master):
        with pytest.raises(MoePruneError, match=r"^search space strategy.seed=range\(0, 3\): strategy=max has no "
                                                r"knob 'seed'"):
            _choices.check(space, loader, master)


@pytest.mark.parametrize("storage, cause", [
    ("bogus://x", "Can't load plugin: sqlalchemy.dialects:bogus"),
    ("sqlite:///{tmp}", "(sqlite3.OperationalError) unable to open database file"),
], ids=["unknown dialect", "sqlite file that is a directory"])
def test_a_storage_that_cannot_be_opened_is_named_in_one_line(tmp_path, storage, cause):
    from sweep_support import moeprune

    spec = storage.format(tmp=tmp_path / "adir")
    (tmp_path / "adir").mkdir()
    proc = moeprune(["-m", "hparams_search=toy_recipe", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={spec}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, tmp_path / "cache", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moeprune: error:")]
    assert errors == [f"moeprune: error: hydra.sweeper.storage={spec!r}: cannot open it ({cause}); expected a "
                      "reachable SQLAlchemy URL (sqlite:///study.db, postgresql://user@host/db) or journal:<file>"], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def grid(tmp_path: Path, *args: str):
    from sweep_support import moeprune

    return moeprune(["-m", *args, "stage=dropmap", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path,
                    tmp_path / "cache", check=False)


@pytest.mark.parametrize("args, message", [
    (["strategy=max,nosuch"], "sweep strategy=max,nosuch: no such preset strategy=nosuch; expected one of: "
     "frequency, gate_mass, geomean, max, mean, random, reap, sum"),
    (["strategy.normalize=rank,zscore"],
     "sweep strategy.normalize=rank,zscore: Invalid value 'zscore', expected one of [rank, mean, none]"),
    # each value composes alone; the grid point reap x alpha does not
    (["strategy=max,reap", "strategy.alpha=1,2"], "sweep strategy.alpha=1,2: strategy=reap has no knob 'alpha'; "
     "its knobs: normalize, protect_top, protect_class_top, rank_ties"),
], ids=["missing preset", "bad enum", "a knob one grid point lacks"])
def test_a_grid_sweep_that_cannot_compose_stops_before_its_first_job(tmp_path, args, message):
    proc = grid(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moeprune: error:")]
    assert errors == [f"moeprune: error: {message}"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "sweep").exists()
