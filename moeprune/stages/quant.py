"""The quant stage (the pruned checkpoint as a GGUF or NVFP4A16 export: moeprune.quant.stage) and
evaluate_quant: the bench run through the quantized file, on the backend that serves it."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.models import pick_device
from moeprune.presets import preset
from moeprune.quant import nvfp4, tiers, toolchain
from moeprune.quant.stage import quantize, scored_card
from moeprune.runner import StageContext
from moeprune.stages.evaluate import evaluate


def run_quant(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    return quantize(cfg.quant_tier, cfg.calibration, cfg.model.name, ctx.inputs["prune"] / "model",
                    ctx.inputs["profile"], ctx.out_dir, Path(cfg.paths.cache_dir))


def run_evaluate_quant(ctx: StageContext) -> dict:
    """The run's config is read as is: what differs for the quantized file (its backend node, the
    dtype of a reload, a loaded model) is handed to evaluate() as values."""
    backend, dtype, path, runtime = eval_backend(ctx.cfg.backend, ctx.cfg.model.device, ctx.inputs["quant"])
    metrics = evaluate(ctx, path, backend=backend, dtype=dtype, **runtime)
    return scored_card(ctx.inputs["quant"], ctx.out_dir, metrics)


def eval_backend(backend: DictConfig, device: str, quant_dir: Path) -> tuple[DictConfig, str | None, Path, dict]:
    """How evaluate_quant runs this quant: (the backend node that runs it, the model dtype it needs
    or None, the path it scores, extra backend arguments). A GGUF goes through llama.cpp: the
    configured backend when it is llama_cpp, else the llama_cpp preset, pointed at the file. An
    NVFP4A16 export is dequantized into a transformers model on `device` and scored on the `hf`
    backend (W4A16 keeps activations in 16 bits, so the dequantized weights compute the same products)."""
    manifest = artifacts.read_json(Path(quant_dir) / "quant-manifest.json")
    if manifest.get("tier", {}).get("kind") == "nvfp4":
        export = Path(quant_dir) / manifest["file"]
        model, _ = nvfp4.reload(export, pick_device(device))
        return _backend(backend, "hf"), "bfloat16", export, {"model": model}
    if not str(manifest.get("file", "")).endswith(".gguf"):
        raise MoePruneError(f"evaluate_quant runs GGUF files; {quant_dir} holds {manifest.get('file')!r}")
    out = _backend(backend, "llama_cpp")
    out.gguf = str(Path(quant_dir) / manifest["file"])  # not the archived imatrix.gguf beside it
    return out, None, Path(quant_dir), {}


def _backend(backend: DictConfig, name: str) -> DictConfig:
    """The configured backend when it is `name`, else the `backend=<name>` preset (keeping the
    configured max_new_tokens)."""
    if backend.name == name:
        return backend.copy()
    out = preset("backend", name)
    out.max_new_tokens = backend.max_new_tokens
    return out


def quant_can_run(cfg: DictConfig) -> None:
    tiers.validate(cfg.quant_tier)  # a tier that cannot be produced: said before the profile, not after prune
    if cfg.quant_tier.kind == "gguf":
        if toolchain.cached() is None and os.environ.get(toolchain.SDIST_ENV):  # the sdist it would build from
            sdist = toolchain.fetch_sdist(toolchain.home() / "sdist")
            toolchain.check_sdist(sdist, f"{toolchain.SDIST_ENV}={sdist}")
    if cfg.quant_tier.kind == "nvfp4":  # CUDA + modelopt: known before any profile or surgery
        nvfp4.require_gpu()
