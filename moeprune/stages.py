"""The pipeline's stages: each a small function of (config slice, upstream artifacts) -> artifact."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.models import load_model, load_tokenizer, read_config, resolve_model_dir
from moeprune.runner import Stage, StageContext

log = logging.getLogger("moeprune")


def model_dir(cfg: DictConfig) -> Path:
    return resolve_model_dir(cfg.model.path, cfg.model.revision)


def _model_input(cfg: DictConfig) -> dict[str, Path]:
    return {"model": model_dir(cfg)}


def run_profile(ctx: StageContext) -> dict:
    from moeprune.adapters import adapter_for
    from moeprune.prune.calibration import load_corpus
    from moeprune.prune.profile import profile_model

    cfg, src = ctx.cfg, model_dir(ctx.cfg)
    adapter = adapter_for(read_config(src))
    corpus = load_corpus(cfg.calibration)
    model, tok = load_model(src, cfg.model.dtype, cfg.model.device), load_tokenizer(src)
    profile = profile_model(model, tok, adapter, corpus, cfg.calibration.max_tokens, cfg.calibration.batch_size)
    profile.save(ctx.out_dir)
    return {"classes": profile.classes, "tokens": sum(profile.tokens.values())}


def run_dropmap(ctx: StageContext) -> dict:
    from moeprune.adapters import adapter_for
    from moeprune.prune import dropmap
    from moeprune.prune.profile import Profile

    profile = Profile.load(ctx.inputs["profile"])
    config = read_config(model_dir(ctx.cfg))
    adapter = adapter_for(config)
    keep = dropmap.keep_count(ctx.cfg.keep, profile.num_experts)
    adapter.validate_keep(config, keep)
    drop_map, summary = dropmap.build(profile, ctx.cfg)
    dropmap.validate(drop_map, profile.layers, profile.num_experts, adapter.top_k(config))
    artifacts.write_json(ctx.out_dir / dropmap.DROP_MAP_FILE, drop_map)
    artifacts.write_json(ctx.out_dir / dropmap.SUMMARY_FILE, summary)
    return {"keep_per_layer": keep, "num_experts": profile.num_experts}


def run_prune(ctx: StageContext) -> dict:
    from moeprune.prune import dropmap
    from moeprune.prune.surgery import prune_checkpoint

    drop_map = {int(k): v for k, v in dropmap.load(ctx.inputs["dropmap"] / dropmap.DROP_MAP_FILE).items()}
    src = model_dir(ctx.cfg)
    out = ctx.out_dir / "model"
    info = prune_checkpoint(src, out, drop_map, ctx.cfg.prune.shared_ffn_alpha, ctx.cfg.prune.max_shard_bytes,
                            recipe={k: _plain(ctx.cfg[k]) for k in ("strategy", "class_weights", "floor_clamp", "keep")})
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {**info, "size_bytes": size}


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def _evaluate(ctx: StageContext, model_path: Path) -> dict:
    from moeprune.evaluate.backends.hf import HFBackend
    from moeprune.evaluate.runner import run_bench

    cfg = ctx.cfg
    if cfg.backend.name != "hf":
        raise MoePruneError(f"backend={cfg.backend.name!r}: expected hf")
    bench = hydra.utils.instantiate(cfg.bench, _convert_="all")
    backend = HFBackend(model_path, cfg.model.dtype, cfg.model.device, cfg.backend.batch_size)
    summary = run_bench(bench, backend, ctx.out_dir, cfg.backend.max_new_tokens)
    size = sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors"))
    return {**summary, "size_bytes": size, "num_experts": backend.model.config.get_text_config().num_experts}


def run_evaluate_base(ctx: StageContext) -> dict:
    return _evaluate(ctx, model_dir(ctx.cfg))


def run_evaluate(ctx: StageContext) -> dict:
    return _evaluate(ctx, ctx.inputs["prune"] / "model")


_EVAL_KEYS = ("bench", "backend", "model.dtype", "model.device")

STAGES = [
    Stage("profile", run_profile, ("model.path", "model.revision", "model.dtype", "calibration"),
          external=_model_input, enabled=lambda c: c.stages.profile),
    Stage("dropmap", run_dropmap, ("strategy", "class_weights", "floor_clamp", "keep"),
          inputs=("profile",), enabled=lambda c: c.stages.dropmap),
    Stage("prune", run_prune, ("prune",), inputs=("dropmap",), external=_model_input,
          enabled=lambda c: c.stages.prune),
    Stage("evaluate_base", run_evaluate_base, _EVAL_KEYS, external=_model_input,
          enabled=lambda c: c.stages.evaluate_base and c.stages.evaluate),
    Stage("evaluate", run_evaluate, _EVAL_KEYS, inputs=("prune",), enabled=lambda c: c.stages.evaluate),
]
