"""The pipeline's stages: each a small function of (config slice, upstream artifacts) -> artifact."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.models import read_config, resolve_model_dir
from moeprune.runner import Stage, StageContext

log = logging.getLogger("moeprune")


def model_dir(cfg: DictConfig) -> Path:
    return resolve_model_dir(cfg.model.path, cfg.model.revision)


def _model_input(cfg: DictConfig) -> dict[str, Path]:
    return {"model": model_dir(cfg)}


def run_profile(ctx: StageContext) -> dict:
    from moeprune.prune.profile.run import profile_checkpoint

    cfg, pc = ctx.cfg, ctx.cfg.profile
    if pc.path is not None:  # a profile made elsewhere (the reference's JSON, imported): copied as the artifact
        profile = given_profile(cfg)
        profile.save(ctx.out_dir)
        return {"classes": profile.classes, "imported_from": str(pc.path)}
    return profile_checkpoint(model_dir(cfg), ctx.out_dir, cfg.calibration, pc, cfg.model.dtype, cfg.model.device,
                              Path(cfg.paths.cache_dir))


def given_profile(cfg: DictConfig):
    """The profile named by profile.path, or None when the run profiles the model itself."""
    from moeprune.profile import Profile

    if cfg.profile.path is None:
        return None
    try:
        return Profile.load(Path(cfg.profile.path))
    except MoePruneError as e:
        raise MoePruneError(f"profile.path={cfg.profile.path}: {e} (`python -m moeprune.prune.profile import "
                            f"IN.json DIR` makes one from the reference's JSON)") from None


def _profile_inputs(cfg: DictConfig) -> dict[str, Path]:
    from moeprune.prune.calibration import calibration_files

    if cfg.profile.path is not None:
        return {"profile": Path(cfg.profile.path)}
    return {**_model_input(cfg), **calibration_files(cfg.calibration)}


def run_dropmap(ctx: StageContext) -> dict:
    from moeprune.adapters import adapter_for
    from moeprune.prune import recipe as dropmap
    from moeprune.dropmap import DropMap
    from moeprune.profile import Profile

    cfg, profile = ctx.cfg, Profile.load(ctx.inputs["profile"])
    config = profiled_config(cfg)
    if config is None:  # an imported profile, no model: the map from the profile alone; the model's checks at prune
        top_k = recorded_top_k(cfg, profile)
        result = dropmap.build(profile, _recipe(cfg), top_k)
        DropMap.parse(result.as_json(), num_experts=profile.num_experts, top_k=top_k, layers=profile.layers,
                      physical=cfg.keep.mode == "uniform")
        return _write_dropmap(ctx, result, profile)
    adapter = adapter_for(config)
    groups = None if cfg.keep.drop_map is not None else dropmap.fit_keep_to_model(_keep(cfg), adapter, config)
    result = dropmap.build(profile, _recipe(cfg), adapter.top_k(config), groups)
    # the one check against the model: layers, ids, top_k, one count (uniform), routing rules (groups...)
    DropMap.for_model(result.as_json(), adapter, config, physical=cfg.keep.mode == "uniform", layers=profile.layers)
    return _write_dropmap(ctx, result, profile)


def given_map(cfg: DictConfig):
    """keep.drop_map checked against the model it will prune: layers, ids, top_k, routing rules."""
    from moeprune.models import check_checkpoint

    try:
        return _map_for_model(Path(cfg.keep.drop_map), model_dir(cfg), physical=cfg.keep.mode == "uniform",
                              layers=check_checkpoint(model_dir(cfg)))
    except MoePruneError as e:
        raise MoePruneError(f"keep.drop_map={cfg.keep.drop_map}: {e}") from None


def run_given_dropmap(ctx: StageContext) -> dict:
    """keep.drop_map in a run that builds no profile (stage=prune, evaluate ...): the map, checked
    against the model, is the artifact. Its summary counts experts but scores none: scoring it by
    the recipe needs the profile, which only stage=all / dropmap / quant compute (a large model
    would pay a calibration pass, and need a tokenizer, for a map it was given)."""
    from moeprune.prune.recipe import DROP_MAP_FILE, SUMMARY_FILE

    cfg, drop_map = ctx.cfg, given_map(ctx.cfg)
    kept = drop_map.kept_counts()
    summary = {"imported_from": str(cfg.keep.drop_map), "scored": False, "num_experts": drop_map.num_experts,
               "keep_mode": cfg.keep.mode, "keep_per_layer": kept[0] if len(kept) == 1 else None,
               "kept_total": sum(len(ids) for ids in drop_map.kept().values()),
               "layers": {str(layer): {"kept": drop_map.num_experts - len(ids), "dropped": len(ids)}
                          for layer, ids in drop_map.items()}}
    artifacts.write_json(ctx.out_dir / DROP_MAP_FILE, drop_map.as_json())
    artifacts.write_json(ctx.out_dir / SUMMARY_FILE, summary)
    return {"keep_per_layer": summary["keep_per_layer"], "num_experts": drop_map.num_experts,
            "kept_total": summary["kept_total"], "outliers_treated": None, "mean_overlap_with_baseline": None}


def profiled_config(cfg: DictConfig) -> dict | None:
    """The config.json of the model the drop map is for: the model dir's, or with `profile.path` the
    one the profile stage recorded beside its profile (None for an imported reference profile)."""
    from moeprune.prune.profile.run import MODEL_CONFIG_FILE

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


def recorded_top_k(cfg: DictConfig, profile) -> int:
    """A given profile's top_k (the reference JSON does not record one: the import takes --top-k)."""
    if profile.meta.get("top_k") is None:
        raise MoePruneError(f"profile.path={cfg.profile.path} records no top_k, which a drop map without the model "
                            "needs: expected it imported with `python -m moeprune.prune.profile import --top-k K "
                            "IN.json DIR` (Gemma 4 26B-A4B: 8)")
    return int(profile.meta["top_k"])


def _write_dropmap(ctx: StageContext, result, profile) -> dict:
    from moeprune.prune import recipe as dropmap

    cfg = ctx.cfg
    dropmap.write(ctx.out_dir, result, title=f"{cfg.strategy.name} / {cfg.class_weights.name} / {cfg.floor_clamp.name}")
    s = result.summary
    overlap = s["baseline"]["mean_overlap"] if s["baseline"] else None
    return {"keep_per_layer": s["keep_per_layer"], "num_experts": profile.num_experts, "kept_total": s["kept_total"],
            "outliers_treated": s["outliers"]["treated"], "mean_overlap_with_baseline": overlap}


def _recipe(cfg: DictConfig):
    from moeprune.presets import class_weight_presets
    from moeprune.prune.recipe import Recipe

    return Recipe.of(cfg.strategy, cfg.class_weights, cfg.floor_clamp, cfg.keep, class_weight_presets)


def _keep(cfg: DictConfig):
    from moeprune.config import KeepConfig, typed

    return typed(cfg.keep, KeepConfig)


def _drop_map(ctx: StageContext, model_path: Path, physical: bool):
    """The dropmap stage's map, checked against the model it is applied to."""
    from moeprune.prune.recipe import DROP_MAP_FILE

    return _map_for_model(ctx.inputs["dropmap"] / DROP_MAP_FILE, model_path, physical)


def _map_for_model(path: Path, model_path: Path, physical: bool, layers: list[int] | None = None):
    """The drop map JSON at `path`, parsed once against the model at `model_path` (DropMap.for_model)."""
    from moeprune.adapters import adapter_for
    from moeprune.dropmap import DropMap

    config = read_config(model_path)
    adapter = adapter_for(config)
    return DropMap.read(path, lambda m: DropMap.for_model(m, adapter, config, physical=physical, layers=layers))


_DROPMAP_FILES = {"floor_clamp.profile": ("floor profile artifact dir", "to rank the floor by the run's own profile"),
                  "floor_clamp.map": ("floor map JSON", "to run without it"),
                  "keep.baseline_map": ("baseline drop map JSON", "to run without it"),
                  "keep.drop_map": ("drop map JSON", "to build the map from the recipe")}


def _dropmap_inputs(cfg: DictConfig) -> dict[str, Path]:
    """The recipe's files, hashed into the cache key. Published recipes name the reference's files
    (v4_layer_floor_map.json ...): say which knob points at a file that is not there."""
    from omegaconf import OmegaConf

    out = {}
    for key, (what, without) in _DROPMAP_FILES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if not Path(value).exists():
            raise MoePruneError(f"{key}={value}: not found; expected a {what} (pass {key}=PATH, or {key}=null "
                                f"{without})")
        is_dir = what.endswith("dir")
        if Path(value).is_dir() != is_dir:
            hint = f" (a dropmap artifact holds {Path(value) / 'drop_map.json'})" if key.startswith("keep.") else ""
            raise MoePruneError(f"{key}={value} is a {'file' if is_dir else 'directory'}: expected a {what}{hint}")
        out[key] = Path(value)
    return out


def run_prune(ctx: StageContext) -> dict:
    from moeprune.prune.surgery import prune_checkpoint

    src = model_dir(ctx.cfg)
    drop_map = _drop_map(ctx, src, physical=True)
    out = ctx.out_dir / "model"
    info = prune_checkpoint(src, out, drop_map, ctx.cfg.prune.shared_ffn_alpha, ctx.cfg.prune.max_shard_bytes,
                            recipe=_recipe(ctx.cfg).settings,
                            mtp_heads=ctx.cfg.prune.mtp_heads)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {**info, "size_bytes": size}


def _evaluate(ctx: StageContext, model_path: Path, drop_map=None, model=None) -> dict:
    """One bench through the configured backend (docs/evaluation.md); drop_map = virtual pruning;
    model = an already loaded model for the hf backend (the NVFP4 reload). A teacher-forced bench
    (bench=divergence) is scored against the reference stage's base side instead of generated."""
    from moeprune.config import build
    from moeprune.evaluate.runner import SAMPLES_FILE, SUMMARY_FILE, run_bench, write_jsonl

    cfg = ctx.cfg
    bench = build(cfg.bench)
    backend = _backend(cfg, model_path, drop_map, model)
    cache = Path(cfg.paths.cache_dir).expanduser() / "generations.sqlite" if cfg.evaluate.resume else None
    try:
        if getattr(bench, "teacher_forced", False):
            from moeprune.evaluate import teacher_forced

            summary, rows = teacher_forced.score(bench, backend, ctx.inputs["reference"])
            write_jsonl(ctx.out_dir / SAMPLES_FILE, rows)
            artifacts.write_json(ctx.out_dir / SUMMARY_FILE, summary)
        else:
            summary = run_bench(bench, backend, ctx.out_dir, cfg.backend.max_new_tokens, cache,
                                cfg.evaluate.empty_threshold)
    finally:
        backend.close()
    keys = ("bench", "n", "score", "stderr", "per_category", "others_mean", "empty_rate", "flags")
    metric = {"metric": summary["metric"]} if "metric" in summary else {}  # the divergence objective's
    return {**{k: summary[k] for k in keys}, **metric, **_model_size(Path(model_path), drop_map)}


def _backend(cfg: DictConfig, model_path: Path, drop_map=None, model=None):
    """The configured backend on `model_path`, with the run values it takes (virtual pruning's map
    and shared-FFN alpha, an already loaded model)."""
    from hydra.utils import get_class

    from moeprune.config import build
    from moeprune.evaluate.backends.base import Backend

    runtime = {"model_dir": model_path, "dtype": cfg.model.dtype, "device": cfg.model.device}
    if drop_map is not None:
        if cfg.backend.name != "hf":
            raise MoePruneError(f"evaluate.virtual=true routes around dropped experts inside a loaded model: "
                                f"expected backend=hf, got {cfg.backend.name!r}")
        runtime["drop_map"] = drop_map
        if cfg.prune.shared_ffn_alpha != 1.0:  # as surgery would scale it, undone after the bench
            from moeprune.prune.surgery import SHARED_MARKER

            if (Path(model_path) / SHARED_MARKER).exists():
                raise MoePruneError(f"{model_path} already has its shared FFN upweighted ({SHARED_MARKER}): "
                                    f"prune.shared_ffn_alpha={cfg.prune.shared_ffn_alpha} would apply it twice; "
                                    f"expected 1.0")
            runtime["shared_ffn_alpha"] = cfg.prune.shared_ffn_alpha
    if model is not None:
        runtime["model"] = model
    takes = getattr(get_class(cfg.backend._target_), "runtime", None)
    backend = build(cfg.backend, **{k: v for k, v in runtime.items() if k in (takes or ())})
    if takes is None or not isinstance(backend, Backend):
        raise MoePruneError(f"backend={cfg.backend.name}: {cfg.backend._target_} builds a {type(backend).__name__}, "
                            f"expected a Backend (runtime, chunk_size, generate, identity, close: "
                            f"evaluate/backends/base.py)")
    return backend


def run_reference(ctx: StageContext) -> dict:
    """The teacher-forced objective's base side (evaluate/teacher_forced.py), once per model and bench."""
    from moeprune.config import build
    from moeprune.evaluate.teacher_forced import build_reference
    from moeprune.prune.calibration import calibration_texts

    cfg = ctx.cfg
    backend = _backend(cfg, model_dir(cfg))
    try:
        return build_reference(build(cfg.bench), backend, ctx.out_dir, calibration_texts(cfg.calibration))
    finally:
        backend.close()


def teacher_forced(cfg: DictConfig) -> bool:
    """Whether the bench is scored by teacher forcing (bench=divergence) rather than by generation."""
    from hydra.utils import get_class

    try:
        return bool(getattr(get_class(cfg.bench._target_), "teacher_forced", False))
    except Exception:  # an unimportable bench fails where it is built, with its own message
        return False


def _model_size(path: Path, drop_map) -> dict:
    """Experts per layer and checkpoint bytes for the results table (virtual: nothing written)."""
    from moeprune.adapters import adapter_for

    if not (path / "config.json").is_file():
        return {"size_bytes": None, "num_experts": None}
    config = read_config(path)
    experts = adapter_for(config).num_experts(config)
    if drop_map:
        kept = drop_map.kept_counts()
        return {"size_bytes": None, "num_experts": kept[0] if len(kept) == 1 else f"{kept[0]}-{kept[-1]}"}
    return {"size_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")), "num_experts": experts}


def run_evaluate_base(ctx: StageContext) -> dict:
    return _evaluate(ctx, model_dir(ctx.cfg))


def run_evaluate(ctx: StageContext) -> dict:
    return _evaluate(ctx, ctx.inputs["prune"] / "model")


def run_evaluate_virtual(ctx: StageContext) -> dict:
    return _evaluate(ctx, model_dir(ctx.cfg), _drop_map(ctx, model_dir(ctx.cfg), physical=False))


def run_validate(ctx: StageContext) -> dict:
    from moeprune.config import build
    from moeprune.evaluate.runner import validate_bench

    report = validate_bench(build(ctx.cfg.bench), ctx.out_dir)
    log.info("validate %s: canonical solutions %s/%s pass, empty answers %s/%s pass", report["bench"],
             report["canonical"]["passed"], report["canonical"]["n"], report["empty"]["passed"], report["empty"]["n"])
    return {"bench": report["bench"], "n": report["n"], "canonical_score": report["canonical"]["score"],
            "canonical_n": report["canonical"]["n"], "empty_score": report["empty"]["score"]}


def run_quant(ctx: StageContext) -> dict:
    from moeprune.quant.stage import quantize

    cfg = ctx.cfg
    return quantize(cfg.quant_tier, cfg.calibration, cfg.model.name, ctx.inputs["prune"] / "model",
                    ctx.inputs["profile"], ctx.out_dir, Path(cfg.paths.cache_dir))


def run_evaluate_quant(ctx: StageContext) -> dict:
    import dataclasses

    from omegaconf import open_dict

    from moeprune.quant.stage import eval_backend, scored_card

    backend, dtype, path, runtime = eval_backend(ctx.cfg.backend, ctx.cfg.model.device, ctx.inputs["quant"])
    cfg = ctx.cfg.copy()
    with open_dict(cfg):
        cfg.backend = backend
        if dtype is not None:  # what the reload holds (NVFP4A16: dequantized weights, 16-bit activations)
            cfg.model.dtype = dtype
    metrics = _evaluate(dataclasses.replace(ctx, cfg=cfg), path, **runtime)
    return scored_card(ctx.inputs["quant"], ctx.out_dir, metrics)


def _recipe_fits(cfg: DictConfig) -> None:
    """The recipe's own mistakes (a knob, a class name, a keep count the model cannot take) are
    known from the config and the model's config.json: say them before the profile is computed."""
    from moeprune.adapters import adapter_for
    from moeprune.presets import class_weight_presets
    from moeprune.prune import recipe as dropmap

    _dropmap_inputs(cfg)  # the recipe's files exist and are what each knob expects
    given = given_profile(cfg)
    if given is not None:  # no model needed: its classes, experts and top_k are the profile's
        profiled_config(cfg)  # a recorded config.json that cannot be read: said before any stage
        if cfg.keep.drop_map is None:
            rule = dropmap.keep_rule(_keep(cfg), given.num_experts, recorded_top_k(cfg, given))
            _floor_fits(cfg, given.layers, given.num_experts, rule.per_layer)
        dropmap.class_weight_vector(given.classes, _recipe(cfg).class_weights, class_weight_presets)
        return
    if cfg.keep.drop_map is not None:  # the map fits the model: known before any profile
        given_map(cfg)
    else:
        from moeprune.models import check_checkpoint

        model_config = read_config(model_dir(cfg))
        adapter = adapter_for(model_config)
        dropmap.fit_keep_to_model(_keep(cfg), adapter, model_config)
        rule = dropmap.keep_rule(_keep(cfg), adapter.num_experts(model_config), adapter.top_k(model_config))
        _floor_fits(cfg, check_checkpoint(model_dir(cfg)), adapter.num_experts(model_config), rule.per_layer)
    recipe = _recipe(cfg)
    dropmap.class_weight_vector(list(cfg.calibration.classes), recipe.class_weights, class_weight_presets)


def _floor_fits(cfg: DictConfig, layers: list[int], num_experts: int, keep: int) -> None:
    """The floor's knobs against the keep count and the layers (a band above keep, a floor map's
    counts), which need no profile: the floor computed on placeholder scores, only for its checks."""
    import numpy as np

    from moeprune.config import FloorClampConfig, typed
    from moeprune.prune import floor

    floor_clamp = typed(cfg.floor_clamp, FloorClampConfig)
    if floor.is_active(floor_clamp):
        floor.floor_counts(floor_clamp, layers, keep, np.ones((len(layers), num_experts)))
        if floor_clamp.profile is not None:  # the user's profile dir: its contents, before any stage
            from moeprune.prune.recipe import floor_profile

            floor_profile(floor_clamp, layers, num_experts, _recipe(cfg).strategy.reference_needs())


def _quant_can_run(cfg: DictConfig) -> None:
    from moeprune.quant import tiers

    tiers.validate(cfg.quant_tier)  # a tier that cannot be produced: said before the profile, not after prune
    if cfg.quant_tier.kind == "gguf":
        from moeprune.quant import toolchain

        if toolchain.cached() is None and os.environ.get(toolchain.SDIST_ENV):  # the sdist it would build from
            sdist = toolchain.fetch_sdist(toolchain.home() / "sdist")
            toolchain.check_sdist(sdist, f"{toolchain.SDIST_ENV}={sdist}")
    if cfg.quant_tier.kind == "nvfp4":  # CUDA + modelopt: known before any profile or surgery
        from moeprune.quant import nvfp4

        nvfp4.require_gpu()


def _prune_fits(cfg: DictConfig) -> None:
    from moeprune.prune.surgery import check_mtp_heads

    check_mtp_heads(cfg.prune.mtp_heads)
    if cfg.keep.mode != "uniform":  # before the profile: surgery would refuse the map at the end
        raise MoePruneError(f"keep.mode={cfg.keep.mode} keeps different counts per layer, which a checkpoint "
                            "cannot hold: expected evaluate.virtual=true (score it by router masking), "
                            "stage=dropmap, or keep.mode=uniform")
    given = given_profile(cfg)
    if given is not None:  # the dropmap stage skipped the model's checks: the surgery needs them
        from moeprune.adapters import adapter_for
        from moeprune.prune import recipe as dropmap

        model_config = read_config(model_dir(cfg))
        adapter = adapter_for(model_config)
        if adapter.num_experts(model_config) != given.num_experts:
            raise MoePruneError(f"profile.path={cfg.profile.path} has {given.num_experts} experts per layer, the model "
                                f"{cfg.model.path} {adapter.num_experts(model_config)}: expected the profile of "
                                "this model (or stage=dropmap, which needs no model)")
        if cfg.keep.drop_map is None:
            dropmap.fit_keep_to_model(_keep(cfg), adapter, model_config)


def _bench_loads(cfg: DictConfig) -> None:
    from moeprune.config import build

    build(cfg.bench).samples()


def _evaluations_can_run(cfg: DictConfig) -> None:
    """The bench's data loads, and backend=llama_cpp has a GGUF for each model it serves: the base
    model's (backend.gguf, else the one *.gguf in its dir), and none for the pruned checkpoint,
    which surgery writes as safetensors. Found before the profile, not after the prune."""
    _bench_loads(cfg)
    if cfg.backend.name != "llama_cpp":
        return
    from moeprune.evaluate.backends.llama_cpp import find_gguf

    if cfg.backend.gguf is None and cfg.stage in (None, "all", "evaluate"):
        raise MoePruneError("backend=llama_cpp serves a .gguf, and the pruned checkpoint holds none (surgery writes "
                            "safetensors): expected backend=hf for the base and pruned checkpoints (with a "
                            "quant_tier, evaluate_quant runs its GGUF through llama_cpp either way), backend.gguf=PATH, "
                            "or stages.evaluate=false")
    find_gguf(model_dir(cfg), cfg.backend.gguf)


def _quant_on(c: DictConfig) -> bool:
    return bool(c.stages.quant) and c.quant_tier.name != "none"


_EVAL_KEYS = ("bench", "backend", "model.dtype", "model.device", "evaluate.empty_threshold")

STAGES = [
    Stage("profile", run_profile, ("model.path", "model.revision", "model.dtype", "calibration",
                                   "profile.neuron_energy", "profile.on_nonfinite"),
          external=_profile_inputs, version=3, enabled=lambda c: c.stages.profile),
    Stage("dropmap", run_dropmap, ("strategy", "class_weights", "floor_clamp", "keep"),
          inputs=("profile",), external=_dropmap_inputs, version=3, enabled=lambda c: c.stages.dropmap,
          preflight=_recipe_fits),
    Stage("prune", run_prune, ("prune",), inputs=("dropmap",), external=_model_input,
          enabled=lambda c: c.stages.prune, preflight=_prune_fits),
    # between prune and evaluate; evaluate_quant runs the bench through the quantized file itself.
    Stage("quant", run_quant, ("quant_tier",), inputs=("profile", "prune"), enabled=_quant_on,
          preflight=_quant_can_run, version=2),  # 2: llama-imatrix reads special tokens as such
    Stage("evaluate_base", run_evaluate_base, _EVAL_KEYS, external=_model_input, version=4,
          enabled=lambda c: c.stages.evaluate_base and c.stages.evaluate, preflight=_evaluations_can_run),
    Stage("evaluate", run_evaluate, _EVAL_KEYS, inputs=("prune",), version=4, enabled=lambda c: c.stages.evaluate,
          preflight=_evaluations_can_run),
    Stage("evaluate_quant", run_evaluate_quant, ("bench", "backend", "evaluate.empty_threshold"), inputs=("quant",),
          version=4, enabled=lambda c: _quant_on(c) and c.stages.evaluate and c.quant_tier.kind in ("gguf", "nvfp4"),
          preflight=_bench_loads),
]

# evaluate.virtual=true: the same "evaluate" stage, scoring the drop map on the base model.
# It applies prune.shared_ffn_alpha in memory, so that knob is part of its key.
EVALUATE_VIRTUAL = Stage("evaluate", run_evaluate_virtual, (*_EVAL_KEYS, "prune.shared_ffn_alpha"), inputs=("dropmap",),
                         external=_model_input, version=4, enabled=lambda c: c.stages.evaluate, preflight=_bench_loads)
VALIDATE = Stage("validate", run_validate, ("bench",), version=3)
# bench=divergence: the base model's continuations and top log-probs, which every evaluate reads.
# The calibration is in the key: its prompts are left out of the held-out set.
REFERENCE = Stage("reference", run_reference, ("bench", "model.dtype", "backend.enable_thinking", "calibration"),
                  external=_model_input, enabled=lambda c: c.stages.evaluate, preflight=_bench_loads)
# keep.drop_map in a run that computes no profile: the same "dropmap" stage, without the profile.
GIVEN_DROPMAP = Stage("dropmap", run_given_dropmap, ("keep",),
                      external=lambda c: {**_dropmap_inputs(c), **_model_input(c)},
                      enabled=lambda c: c.stages.dropmap, preflight=_recipe_fits)


def stages_for(cfg: DictConfig) -> list[Stage]:
    """The stage list this config runs: evaluate.validate checks only the bench's scorer;
    evaluate.virtual swaps the physical evaluate for the virtual one and drops the prune stage and
    everything built on it (nothing is written for a virtual trial)."""
    if cfg.evaluate.validate:
        return [VALIDATE]
    stages = STAGES
    if cfg.keep.drop_map is not None and not _profiles(cfg):
        stages = [GIVEN_DROPMAP if s.name == "dropmap" else s for s in STAGES]
    if teacher_forced(cfg):
        stages = _teacher_forced_stages(cfg, stages)
    if not cfg.evaluate.virtual:
        return stages
    if cfg.backend.name != "hf":  # before any work: the profile would be wasted
        raise MoePruneError(f"evaluate.virtual=true routes around dropped experts inside a loaded model: "
                            f"expected backend=hf, got {cfg.backend.name!r}")
    out, gone = [], {"prune"}
    for stage in stages:
        if stage.name == "evaluate":
            out.append(_with_reference(EVALUATE_VIRTUAL) if teacher_forced(cfg) else EVALUATE_VIRTUAL)
        elif stage.name in gone or gone & set(stage.inputs):
            gone.add(stage.name)
        else:
            out.append(stage)
    return out


def _with_reference(stage: Stage) -> Stage:
    import dataclasses

    return dataclasses.replace(stage, inputs=(*stage.inputs, "reference"))


def _teacher_forced_stages(cfg: DictConfig, stages: list[Stage]) -> list[Stage]:
    """bench=divergence: the reference stage first, and every evaluate reads it. The objective runs
    inside a loaded model (backend=hf); a quantized file is judged by a generating bench."""
    if cfg.backend.name != "hf":
        raise MoePruneError(f"bench={cfg.bench.name} teacher-forces the model's own continuations: expected "
                            f"backend=hf, got {cfg.backend.name!r}")
    if _quant_on(cfg) and cfg.stages.evaluate:
        raise MoePruneError(f"bench={cfg.bench.name} has no evaluate_quant (a GGUF served by llama.cpp gives no "
                            f"log-probabilities over the vocabulary): expected quant_tier=none, stages.evaluate=false, "
                            "or a generating bench for the quantized file")
    named = {"evaluate_base", "evaluate"}
    out = [REFERENCE]
    for stage in stages:
        out.append(_with_reference(stage) if stage.name in named else stage)
    return out


def _profiles(cfg: DictConfig) -> bool:
    """Whether the run computes the profile for a reason other than building a drop map: stage=all
    (or profile, dropmap: with keep.drop_map, the point of the dropmap stage is scoring the given
    map) or a stage that reads it (quant's calibration texts)."""
    from moeprune.runner import upstream

    if not cfg.stages.profile:
        return False
    target = cfg.get("stage")
    if target in (None, "all", "profile", "dropmap"):
        return True
    given = {s.name: GIVEN_DROPMAP if s.name == "dropmap" else s for s in STAGES}  # its map reads no profile
    return target in given and "profile" in upstream(given, target)  # an unknown stage: the runner says so
