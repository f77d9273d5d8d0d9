"""The evaluate stages (evaluate_base, evaluate, the virtual evaluate), the reference stage of a
teacher-forced bench, and validate: one bench through the configured backend (docs/evaluation.md)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.adapters import adapter_for
from moeprune.config import build
from moeprune.dropmap import DropMap, VirtualPrune
from moeprune.errors import MoePruneError
from moeprune.evaluate import teacher_forced as tf
from moeprune.evaluate.backends.base import Backend
from moeprune.evaluate.backends.llama_cpp import find_gguf
from moeprune.evaluate.bench_run import SAMPLES_FILE, SUMMARY_FILE, run_bench, validate_bench, write_jsonl
from moeprune.models import read_config
from moeprune.prune.calibration import calibration_texts
from moeprune.prune.surgery import SHARED_MARKER
from moeprune.runner import StageContext
from moeprune.stages.dropmap import stage_map
from moeprune.stages.plan import model_dir

log = logging.getLogger("moeprune")


def evaluate(ctx: StageContext, model_path: Path, *, backend: DictConfig | None = None, dtype: str | None = None,
             drop_map: DropMap | None = None, model=None) -> dict:
    """One bench on `model_path`, through `backend` (default: the configured one) at `dtype` (default:
    model.dtype); drop_map = virtual pruning; model = an already loaded model for the hf backend (the
    NVFP4 reload). A teacher-forced bench (bench=divergence) is scored against the reference stage's
    base side instead of generated."""
    cfg = ctx.cfg
    node = cfg.backend if backend is None else backend
    bench = build(cfg.bench)
    served = make_backend(cfg, model_path, node, dtype or cfg.model.dtype, drop_map, model)
    cache = Path(cfg.paths.cache_dir).expanduser() / "generations.sqlite" if cfg.evaluate.resume else None
    try:
        if getattr(bench, "teacher_forced", False):
            summary, rows = tf.score(bench, served, ctx.inputs["reference"])
            write_jsonl(ctx.out_dir / SAMPLES_FILE, rows)
            artifacts.write_json(ctx.out_dir / SUMMARY_FILE, summary)
        else:
            summary = run_bench(bench, served, ctx.out_dir, node.max_new_tokens, cache, cfg.evaluate.empty_threshold)
    finally:
        served.close()
    keys = ("bench", "n", "score", "stderr", "per_category", "others_mean", "empty_rate", "flags")
    metric = {"metric": summary["metric"]} if "metric" in summary else {}  # the divergence objective's
    return {**{k: summary[k] for k in keys}, **metric, **_model_size(Path(model_path), drop_map)}


def make_backend(cfg: DictConfig, model_path: Path, node: DictConfig | None = None, dtype: str | None = None,
                 drop_map: DropMap | None = None, model=None) -> Backend:
    """The backend `node` (default: the configured one) on `model_path`, with the run values it takes
    (virtual pruning's map and shared-FFN alpha as one VirtualPrune, an already loaded model)."""
    node = cfg.backend if node is None else node
    runtime = {"model_dir": model_path, "dtype": dtype or cfg.model.dtype, "device": cfg.model.device}
    if drop_map is not None:
        if node.name != "hf":
            raise MoePruneError(f"evaluate.virtual=true routes around dropped experts inside a loaded model: "
                                f"expected backend=hf, got {node.name!r}")
        alpha = cfg.prune.shared_ffn_alpha  # as surgery would scale it, undone after the bench
        if alpha != 1.0 and (Path(model_path) / SHARED_MARKER).exists():
            raise MoePruneError(f"{model_path} already has its shared FFN upweighted ({SHARED_MARKER}): "
                                f"prune.shared_ffn_alpha={alpha} would apply it twice; expected 1.0")
        runtime["virtual"] = VirtualPrune(drop_map, alpha)
    if model is not None:
        runtime["model"] = model
    takes = getattr(get_class(node._target_), "runtime", None)
    backend = build(node, **{k: v for k, v in runtime.items() if k in (takes or ())})
    if takes is None or not isinstance(backend, Backend):
        raise MoePruneError(f"backend={node.name}: {node._target_} builds a {type(backend).__name__}, "
                            f"expected a Backend (runtime, chunk_size, generate, identity, close: "
                            f"evaluate/backends/base.py)")
    return backend


def _model_size(path: Path, drop_map: DropMap | None) -> dict:
    """Experts per layer and checkpoint bytes for the results table (virtual: nothing written)."""
    if not (path / "config.json").is_file():
        return {"size_bytes": None, "num_experts": None}
    config = read_config(path)
    experts = adapter_for(config).num_experts(config)
    if drop_map:
        kept = drop_map.kept_counts()
        return {"size_bytes": None, "num_experts": kept[0] if len(kept) == 1 else f"{kept[0]}-{kept[-1]}"}
    return {"size_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")), "num_experts": experts}


def run_evaluate_base(ctx: StageContext) -> dict:
    return evaluate(ctx, model_dir(ctx.cfg))


def run_evaluate(ctx: StageContext) -> dict:
    return evaluate(ctx, ctx.inputs["prune"] / "model")


def run_evaluate_virtual(ctx: StageContext) -> dict:
    return evaluate(ctx, model_dir(ctx.cfg), drop_map=stage_map(ctx, model_dir(ctx.cfg), physical=False))


def run_reference(ctx: StageContext) -> dict:
    """The teacher-forced objective's base side (evaluate/teacher_forced.py), once per model and bench."""
    cfg = ctx.cfg
    backend = make_backend(cfg, model_dir(cfg))
    try:
        return tf.build_reference(build(cfg.bench), backend, ctx.out_dir, calibration_texts(cfg.calibration))
    finally:
        backend.close()


def run_validate(ctx: StageContext) -> dict:
    report = validate_bench(build(ctx.cfg.bench), ctx.out_dir)
    log.info("validate %s: canonical solutions %s/%s pass, empty answers %s/%s pass", report["bench"],
             report["canonical"]["passed"], report["canonical"]["n"], report["empty"]["passed"], report["empty"]["n"])
    return {"bench": report["bench"], "n": report["n"], "canonical_score": report["canonical"]["score"],
            "canonical_n": report["canonical"]["n"], "empty_score": report["empty"]["score"]}


def teacher_forced(cfg: DictConfig) -> bool:
    """Whether the bench is scored by teacher forcing (bench=divergence) rather than by generation."""
    try:
        return bool(getattr(get_class(cfg.bench._target_), "teacher_forced", False))
    except Exception:  # an unimportable bench fails where it is built, with its own message
        return False


def bench_loads(cfg: DictConfig) -> None:
    build(cfg.bench).samples()


def evaluations_can_run(cfg: DictConfig) -> None:
    """The bench's data loads, and backend=llama_cpp has a GGUF for each model it serves: the base
    model's (backend.gguf, else the one *.gguf in its dir), and none for the pruned checkpoint,
    which surgery writes as safetensors. Found before the profile, not after the prune."""
    bench_loads(cfg)
    if cfg.backend.name != "llama_cpp":
        return
    if cfg.backend.gguf is None and cfg.stage in (None, "all", "evaluate"):
        raise MoePruneError("backend=llama_cpp serves a .gguf, and the pruned checkpoint holds none (surgery writes "
                            "safetensors): expected backend=hf for the base and pruned checkpoints (with a "
                            "quant_tier, evaluate_quant runs its GGUF through llama_cpp either way), backend.gguf=PATH, "
                            "or stages.evaluate=false")
    find_gguf(model_dir(cfg), cfg.backend.gguf)
