"""The quant stage (the pruned checkpoint as its tier's kind makes it: moeprune.quant.stage) and
evaluate_quant: the bench run through the quantized file, on the backend its kind names. Kinds are
looked up by name (moeprune.quant.tiers.kind_of) and their hooks called: none is named here."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.presets import preset
from moeprune.quant import tiers
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
    or None, the path it scores, extra backend arguments), from the `scoring` hook of the kind its
    manifest names (a GGUF through llama.cpp, an NVFP4A16 export through its dequantized reload on hf)."""
    manifest = artifacts.read_json(Path(quant_dir) / "quant-manifest.json")
    kind = tiers.kind_of(manifest.get("tier", {}).get("kind"), f"{Path(quant_dir) / 'quant-manifest.json'}: tier")
    if kind.scoring is None:
        raise MoePruneError(f"evaluate_quant: a {kind.kind} tier has no evaluate_quant; {quant_dir} is one")
    scoring = kind.scoring(Path(quant_dir), manifest, device)
    out = _backend(backend, scoring.backend)
    for knob, value in scoring.knobs.items():
        out[knob] = value
    return out, scoring.dtype, scoring.path, dict(scoring.runtime)


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
    tier = cfg.quant_tier
    tiers.kind_of(tier.kind, f"quant_tier {tier.name!r}").preflight(tier)  # its tool or device: likewise


def quant_scored(cfg: DictConfig) -> bool:
    """Whether the tier's kind has an evaluate_quant (a `scoring` hook)."""
    return tiers.kind_of(cfg.quant_tier.kind, f"quant_tier {cfg.quant_tier.name!r}").scoring is not None
