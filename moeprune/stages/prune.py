"""The prune stage: surgery writes the pruned checkpoint from the dropmap stage's map."""

from __future__ import annotations

from omegaconf import DictConfig

from moeprune.adapters import adapter_for
from moeprune.errors import MoePruneError
from moeprune.models import read_config
from moeprune.prune import recipe as engine
from moeprune.prune.surgery import check_mtp_heads, prune_checkpoint
from moeprune.runner import StageContext
from moeprune.stages.dropmap import stage_map
from moeprune.stages.plan import keep, model_dir, recipe
from moeprune.stages.profile import given_profile


def run_prune(ctx: StageContext) -> dict:
    src = model_dir(ctx.cfg)
    drop_map = stage_map(ctx, src, physical=True)
    out = ctx.out_dir / "model"
    info = prune_checkpoint(src, out, drop_map, ctx.cfg.prune.shared_ffn_alpha, ctx.cfg.prune.max_shard_bytes,
                            recipe=recipe(ctx.cfg).settings,
                            mtp_heads=ctx.cfg.prune.mtp_heads)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {**info, "size_bytes": size}


def prune_fits(cfg: DictConfig) -> None:
    check_mtp_heads(cfg.prune.mtp_heads)
    if cfg.keep.mode != "uniform":  # before the profile: surgery would refuse the map at the end
        raise MoePruneError(f"keep.mode={cfg.keep.mode} keeps different counts per layer, which a checkpoint "
                            "cannot hold: expected evaluate.virtual=true (score it by router masking), "
                            "stage=dropmap, or keep.mode=uniform")
    given = given_profile(cfg)
    if given is not None:  # the dropmap stage skipped the model's checks: the surgery needs them
        model_config = read_config(model_dir(cfg))
        adapter = adapter_for(model_config)
        if adapter.num_experts(model_config) != given.num_experts:
            raise MoePruneError(f"profile.path={cfg.profile.path} has {given.num_experts} experts per layer, the model "
                                f"{cfg.model.path} {adapter.num_experts(model_config)}: expected the profile of "
                                "this model (or stage=dropmap, which needs no model)")
        if cfg.keep.drop_map is None:
            engine.fit_keep_to_model(keep(cfg), adapter, model_config)
