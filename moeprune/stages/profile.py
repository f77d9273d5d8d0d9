"""The profile stage: the model profiled over the calibration corpus, or a profile made elsewhere
(`profile.path`, e.g. the reference's JSON imported) copied as the artifact."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.models import read_config
from moeprune.profile import Profile
from moeprune.prune.calibration import calibration_files
from moeprune.prune.profile.run import MODEL_CONFIG_FILE, profile_checkpoint
from moeprune.runner import StageContext
from moeprune.stages.plan import model_dir, model_input


def run_profile(ctx: StageContext) -> dict:
    cfg, pc = ctx.cfg, ctx.cfg.profile
    if pc.path is not None:  # a profile made elsewhere (the reference's JSON, imported): copied as the artifact
        profile = given_profile(cfg)
        profile.save(ctx.out_dir)
        return {"classes": profile.classes, "imported_from": str(pc.path)}
    return profile_checkpoint(model_dir(cfg), ctx.out_dir, cfg.calibration, pc, cfg.model.dtype, cfg.model.device,
                              Path(cfg.paths.cache_dir))


def given_profile(cfg: DictConfig) -> Profile | None:
    """The profile named by profile.path, or None when the run profiles the model itself."""
    if cfg.profile.path is None:
        return None
    try:
        return Profile.load(Path(cfg.profile.path))
    except MoePruneError as e:
        raise MoePruneError(f"profile.path={cfg.profile.path}: {e} (`python -m moeprune.prune.profile import "
                            f"IN.json DIR` makes one from the reference's JSON)") from None


def profile_inputs(cfg: DictConfig) -> dict[str, Path]:
    if cfg.profile.path is not None:
        return {"profile": Path(cfg.profile.path)}
    return {**model_input(cfg), **calibration_files(cfg.calibration)}


def profiled_config(cfg: DictConfig) -> dict | None:
    """The config.json of the model the drop map is for: the model dir's, or with `profile.path` the
    one the profile stage recorded beside its profile (None for an imported reference profile)."""
    if cfg.profile.path is None:
        return read_config(model_dir(cfg))
    recorded = Path(cfg.profile.path) / MODEL_CONFIG_FILE
    if not recorded.is_file():
        return None
    try:
        config = artifacts.read_json(recorded)
    except (OSError, ValueError) as e:
        config = e
    if not isinstance(config, dict):
        raise MoePruneError(f"profile.path={cfg.profile.path}: {recorded} is not a config.json ({config}): expected "
                            "the model's config.json as the profile stage recorded it, or no such file (the map "
                            "then follows the profile alone)")
    return config


def recorded_top_k(cfg: DictConfig, profile: Profile) -> int:
    """A given profile's top_k (the reference JSON does not record one: the import takes --top-k)."""
    if profile.meta.get("top_k") is None:
        raise MoePruneError(f"profile.path={cfg.profile.path} records no top_k, which a drop map without the model "
                            "needs: expected it imported with `python -m moeprune.prune.profile import --top-k K "
                            "IN.json DIR` (Gemma 4 26B-A4B: 8)")
    return int(profile.meta["top_k"])
