"""Command-line overrides checked before Hydra runs, so a config mistake ends like every other
moeprune error: one `moeprune: error: ...` line, exit 2, naming the knob and what was expected.

Hydra reports a failed composition itself (its own message, exit 1) from inside its main; composing
the same overrides first with the compose API catches the error where it can be explained: a knob
another component owns gets the component and its real knobs (`strategy=reap has no knob 'alpha'`).
"""

from __future__ import annotations

import dataclasses

from hydra import compose, initialize_config_module
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from moeprune import components
from moeprune.errors import MoePruneError

CONFIG_MODULE, CONFIG_NAME = "moeprune.conf", "run"
_NOT_KNOBS = ("_target_", "name")


def check(argv: list[str]) -> None:
    """Compose `argv`'s overrides as `moeprune` would; raise MoePruneError explaining the first
    mistake. Sweeps, help and other config dirs are left to Hydra."""
    args = get_args_parser().parse_args(argv)
    if (args.multirun or args.help or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.config_name or args.config_dir or args.experimental_rerun):
        return
    try:
        cfg = _compose(args.overrides)
    except (ConfigCompositionException, OverrideParseException) as e:
        raise MoePruneError(explain(e, args.overrides)) from None
    for group in components.SCHEMAS:  # `+strategy.seed=7` appends past the schema: its component never reads it
        schema = OmegaConf.get_type(cfg[group])
        known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else set(cfg[group])
        for key in cfg[group]:
            if key not in known:
                raise MoePruneError(_unknown_knob(f"{group}.{key}", args.overrides))


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)


def explain(error: Exception, overrides: list[str]) -> str:
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return _unknown_knob(cause.full_key, overrides)
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        given = _override_of(cause.full_key, overrides)
        return f"{given or cause.full_key}: {str(cause).splitlines()[0]}"
    text = str(error).split("Config search path:")[0]  # Hydra appends its search path: noise here
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _unknown_knob(full_key: str, overrides: list[str]) -> str:
    given = _override_of(full_key, overrides) or full_key
    parent, _, knob = full_key.rpartition(".")
    try:  # the config without the bad override: what the node really holds
        cfg = _compose([o for o in overrides if o != given])
    except (ConfigCompositionException, OverrideParseException):
        return f"{given}: no such knob"
    node = OmegaConf.select(cfg, parent) if parent else cfg
    knobs = [k for k in node if k not in _NOT_KNOBS] if isinstance(node, DictConfig) else []
    group = parent.split(".")[0]
    if group in components.SCHEMAS:
        owner = f"{group}={cfg.hydra.runtime.choices[group]}" + parent[len(group):]
        expected = "; its knobs: " + ", ".join(knobs)
    else:
        owner, expected = parent or "the run config", "; expected one of: " + ", ".join(knobs)
    return f"{given}: {owner} has no knob {knob!r}{expected}"


def _override_of(full_key: str, overrides: list[str]) -> str | None:
    """The command-line override that set `full_key` or a key inside it (as typed), if one did."""
    for override in overrides:
        try:
            parsed = OverridesParser.create().parse_override(override)
        except OverrideParseException:
            continue
        if parsed.key_or_group == full_key or parsed.key_or_group.startswith(full_key + "."):
            return override
    return None
