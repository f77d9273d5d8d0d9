"""Command-line overrides checked before Hydra runs, so a config mistake ends like every other
moeprune error: one `moeprune: error: ...` line, exit 2, naming the knob and what was expected.

Hydra reports a failed composition itself (its own message, exit 1) from inside its main; composing
the same overrides first catches the error where it can be explained: a knob another component owns
gets the component and its real knobs (`strategy=reap has no knob 'alpha'`), a missing preset the
group's presets. `verify` is the one check: the CLI runs it on a run's overrides (a sweep's fixed
ones), the Optuna sweeper on each choice of its search space with its own config loader.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Callable, Mapping

from hydra._internal.utils import get_args_parser
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from moeprune import schema
from moeprune.errors import MoePruneError

CONFIG_MODULE, CONFIG_NAME = "moeprune.conf", "run"
_NOT_KNOBS = ("_target_", "name")
Compose = Callable[[list], DictConfig]  # overrides -> the composed config, its hydra node included
Presets = Callable[[str], list]  # a config group -> its presets


def check(argv: list[str]) -> None:
    """Compose `argv`'s overrides as `moeprune` would; raise MoePruneError explaining the first
    mistake. A sweep (-m) composes its fixed overrides here, as Hydra does before it starts the
    sweeper, and each value of a grid sweep; the Optuna sweeper checks its own search space. Help and
    other config dirs are left to Hydra."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    args = get_args_parser().parse_args(argv)
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.config_name or args.config_dir or args.experimental_rerun):
        return
    for override in args.overrides:
        _check_syntax(override)
    given = [o for o in args.overrides if not (args.multirun and _is_sweep(o))]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        searchpath = any("hydra.searchpath" in o for o in given)  # presets the loader does not list
        compose = lambda o: loader.load_configuration(CONFIG_NAME, list(o), RunMode.RUN, from_shell=False)  # noqa: E731
        presets = None if searchpath else presets_of(loader)
        verify(given, compose, presets)
        if args.multirun:
            _grid_values_compose([o for o in args.overrides if _is_sweep(o)], given, compose, presets)


def _check_syntax(override: str) -> None:
    """Raise MoePruneError naming an override Hydra's grammar rejects: an unbalanced bracket, a
    character the grammar does not take unquoted (a space, non-ASCII), a sweep function given words
    (`range(a,b)`). Hydra would print a traceback for some and a bare grammar message for others."""
    try:
        OverridesParser.create().parse_override(override)
    except HydraException as e:
        reason = " ".join(str(e).split(" See https://")[0].split())
        key, _, value = override.partition("=")
        if "while evaluating" in reason:
            hint = "expected numbers as a sweep function's bounds, e.g. range(0,3) or interval(0.5,4)"
        else:
            hint = ("expected key=value in Hydra's override syntax; quote a value that holds spaces, brackets, "
                    f"commas or non-ASCII characters: \"{key}='{value}'\"")
        raise MoePruneError(f"{override}: cannot parse this override ({reason}); {hint}") from None


GRID_POINTS_CHECKED = 64  # ~0.35 s a composition: a larger grid has each value checked alone


def _grid_values_compose(sweeps: list[str], given: list[str], compose: Compose, presets: Presets | None) -> None:
    """Hydra's own grid sweeper (`-m strategy=max,reap strategy.alpha=1,2` with no Optuna preset)
    composes each job as it launches it and fails there in its own words: compose every grid point
    first (a knob may exist for one choice of a group and not another); past GRID_POINTS_CHECKED
    points, each value of each swept override with the others as given."""
    if not sweeps or not str(OmegaConf.select(compose(given), "hydra.sweeper._target_")).endswith("BasicSweeper"):
        return  # the Optuna sweeper checks its search space itself
    axes = []
    for sweep in sweeps:
        parsed = _parsed(sweep)
        axes.append([(f"{parsed.get_key_element()}={v}", sweep) for v in parsed.sweep_string_iterator()])
    if math.prod(len(a) for a in axes) <= GRID_POINTS_CHECKED:
        points = itertools.product(*axes)
    else:
        points = ((value,) for axis in axes for value in axis)
    for point in points:
        verify([*given, *(one for one, _ in point)], compose, presets, {one: f"sweep {sweep}" for one, sweep in point})


def presets_of(loader) -> Presets:
    return lambda group: loader.get_group_options(group, results_filter=ObjectType.CONFIG)


def verify(overrides: list[str], compose: Compose, presets: Presets | None,
           shown: Mapping[str, str] | None = None) -> None:
    """Raise MoePruneError explaining the first mistake of `overrides`: a missing preset, a knob its
    component does not have, a wrong type or enum value. `presets` lists a group's presets (None
    where an extra search path adds some); `shown` names an override as the user wrote it (a
    sweep's `search space strategy.alpha=interval(1,4)`)."""
    shown = shown or {}
    try:
        cfg = compose(overrides)
    except yaml.YAMLError as e:  # a preset file (hydra.searchpath, a user's conf dir) that is not YAML
        raise MoePruneError(_not_yaml(e)) from None
    except (ConfigCompositionException, OverrideParseException) as e:
        if presets is not None:
            _presets_exist(overrides, presets, shown)  # a missing preset first: the rest follows from it
        raise MoePruneError(explain(e, overrides, compose, shown)) from None
    if presets is not None and not OmegaConf.select(cfg, "hydra.searchpath"):
        _presets_exist(overrides, presets, shown)  # an optional group (recipe, hparams_search) skips a missing one
    for group in schema.groups():  # `+strategy.seed=7` appends past the schema: its component never reads it
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        bad = schema.invalid_choice(node, group)  # a registered value (a tier kind) no enum lists
        if bad:
            key, value, why = bad
            given = _override_of(key, overrides) or f"{key}={value}"
            raise MoePruneError(f"{shown.get(given, given)}: {why}")
        kind = OmegaConf.get_type(node)
        known = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else set(node)
        for key in node:
            if key not in known:
                raise MoePruneError(_unknown_knob(f"{group}.{key}", overrides, compose, shown))


def _not_yaml(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "a config file"
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    context = getattr(e, "context", None)
    return (f"{where}: not valid YAML ({context + ': ' if context else ''}{problem}); expected a YAML mapping "
            "of knobs, as the presets in moeprune/conf are")


def _parsed(override: str) -> Override | None:
    """`override` parsed, or None where it does not parse (composing says what is wrong with it).
    Hydra's grammar raises its base HydraException for a lexer or function error (`[`, a non-ASCII
    character, `range(a,b)`), not only OverrideParseException."""
    try:
        return OverridesParser.create().parse_override(override)
    except HydraException:
        return None


def _is_sweep(override: str) -> bool:
    parsed = _parsed(override)
    return parsed is not None and parsed.is_sweep_override()


def _presets_exist(overrides: list[str], presets: Presets, shown: Mapping[str, str]) -> None:
    for override in overrides:
        parsed = _parsed(override)
        if parsed is None or parsed.is_delete() or parsed.is_sweep_override() or not isinstance(parsed.value(), str):
            continue
        value = parsed.value()
        group = parsed.key_or_group
        options = presets(group)
        if options and value not in options:
            raise MoePruneError(_no_preset(shown.get(override, override), group, value, options))


def _no_preset(given: str, group: str, name: str, options) -> str:
    which = "" if given == f"{group}={name}" else f" {group}={name}"  # a sweep: which of its choices
    return f"{given}: no such preset{which}; expected one of: {', '.join(options)}"


def explain(error: Exception, overrides: list[str], compose: Compose, shown: Mapping[str, str]) -> str:
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        given = next((o for o in overrides if _sets(o, group, name)), None)  # else a preset's defaults name it
        return _no_preset(shown.get(given, given) if given else f"{group}={name}", group, name, error.options)
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return _unknown_knob(cause.full_key, overrides, compose, shown)
    if isinstance(cause, ValidationError) and "is not a subclass of" in str(cause) and cause.full_key:
        node = re.sub(r"\[\d+\]$", "", cause.full_key)  # `+calibration.classes.mine=[{kind: jsonl, ...}]`
        given = _override_of(node, overrides)
        if given:
            group = node.split(".")[0]
            return (f"{shown.get(given, given)}: {node} takes typed entries that OmegaConf cannot build from a "
                    f"command-line list of {{...}}; expected them in a {group} preset: copy one of "
                    f"moeprune/conf/{group}/ into <dir>/{group}/<name>.yaml, add them there, and pass "
                    f"hydra.searchpath=[file://<dir>] {group}=<name>")
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        given = _override_of(cause.full_key, overrides)
        return f"{shown.get(given, given) if given else cause.full_key}: {str(cause).splitlines()[0]}"
    text = str(error).split("Config search path:")[0]  # Hydra appends its search path: noise here
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _unknown_knob(full_key: str, overrides: list[str], compose: Compose, shown: Mapping[str, str]) -> str:
    given = _override_of(full_key, overrides) or full_key
    parent, _, knob = full_key.rpartition(".")
    try:  # the config without the bad override, nor others inside that node: what the node really holds
        cfg = compose([o for o in overrides if o != given and not (parent and _sets_inside(o, parent))])
    except (ConfigCompositionException, OverrideParseException):
        return f"{shown.get(given, given)}: no such knob"
    node = OmegaConf.select(cfg, parent) if parent else cfg
    knobs = [k for k in node if k not in _NOT_KNOBS] if isinstance(node, DictConfig) else []
    group = parent.split(".")[0]
    no_knob = getattr(OmegaConf.get_type(node), "no_knob", None) if isinstance(node, DictConfig) else None
    if no_knob:  # a schema that says why (a quant tier: another kind's knob)
        return f"{shown.get(given, given)}: {no_knob()}"
    if group in schema.groups():
        owner = f"{group}={cfg.hydra.runtime.choices[group]}" + parent[len(group):]
        expected = "; its knobs: " + ", ".join(knobs)
    else:
        owner, expected = parent or "the run config", "; expected one of: " + ", ".join(knobs)
    return f"{shown.get(given, given)}: {owner} has no knob {knob!r}{expected}"


def _sets(override: str, group: str, name: str) -> bool:
    parsed = _parsed(override)
    return parsed is not None and parsed.key_or_group == group and parsed.value() == name


def _sets_inside(override: str, node: str) -> bool:
    parsed = _parsed(override)
    return parsed is not None and parsed.key_or_group.startswith(node + ".")


def _override_of(full_key: str, overrides: list[str]) -> str | None:
    """The command-line override that set `full_key` or a key inside it (as typed), if one did."""
    for override in overrides:
        parsed = _parsed(override)
        if parsed is not None and (parsed.key_or_group == full_key or parsed.key_or_group.startswith(full_key + ".")):
            return override
    return None
