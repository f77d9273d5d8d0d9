"""The pipeline's stages: each a small function of (config slice, upstream artifacts) -> artifact.

One module per stage (profile, dropmap, prune, quant, evaluate), each with the preflight checks of
its inputs beside it; plan.py holds what they all read (the model dir, the run's recipe). This
module is the table the runner runs, and which of its stages a config selects (`stages_for`).
A Stage's name, config-slice keys and version make its cache key: change them only on purpose."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from moeprune.errors import MoePruneError
from moeprune.runner import Stage, upstream
from moeprune.stages.dropmap import dropmap_inputs, recipe_fits, run_dropmap, run_given_dropmap
from moeprune.stages.evaluate import (bench_loads, evaluations_can_run, run_evaluate, run_evaluate_base,
                                      run_evaluate_virtual, run_reference, run_validate, teacher_forced)
from moeprune.stages.plan import model_input
from moeprune.stages.profile import profile_inputs, run_profile
from moeprune.stages.prune import prune_fits, run_prune
from moeprune.stages.quant import quant_can_run, quant_scored, run_evaluate_quant, run_quant

__all__ = ["STAGES", "EVALUATE_VIRTUAL", "VALIDATE", "REFERENCE", "GIVEN_DROPMAP", "Stage", "stages_for",
           "run_evaluate_base", "run_evaluate_quant"]


def _quant_on(c: DictConfig) -> bool:
    return bool(c.stages.quant) and c.quant_tier.kind != "none"  # what a tier does is its kind's, not its name's


def _evaluate_quant_on(c: DictConfig) -> bool:
    return _quant_on(c) and bool(c.stages.evaluate) and quant_scored(c)


_EVAL_KEYS = ("bench", "backend", "model.dtype", "model.device", "evaluate.empty_threshold")

STAGES = [
    Stage("profile", run_profile, ("model.path", "model.revision", "model.dtype", "calibration",
                                   "profile.neuron_energy", "profile.on_nonfinite"),
          external=profile_inputs, version=3, enabled=lambda c: c.stages.profile),
    Stage("dropmap", run_dropmap, ("strategy", "class_weights", "floor_clamp", "keep"),
          inputs=("profile",), external=dropmap_inputs, version=3, enabled=lambda c: c.stages.dropmap,
          preflight=recipe_fits),
    Stage("prune", run_prune, ("prune",), inputs=("dropmap",), external=model_input,
          enabled=lambda c: c.stages.prune, preflight=prune_fits),
    # between prune and evaluate; evaluate_quant runs the bench through the quantized file itself.
    Stage("quant", run_quant, ("quant_tier",), inputs=("profile", "prune"), enabled=_quant_on,
          preflight=quant_can_run, version=2),  # 2: llama-imatrix reads special tokens as such
    Stage("evaluate_base", run_evaluate_base, _EVAL_KEYS, external=model_input, version=4,
          enabled=lambda c: c.stages.evaluate_base and c.stages.evaluate, preflight=evaluations_can_run),
    Stage("evaluate", run_evaluate, _EVAL_KEYS, inputs=("prune",), version=4, enabled=lambda c: c.stages.evaluate,
          preflight=evaluations_can_run),
    Stage("evaluate_quant", run_evaluate_quant, ("bench", "backend", "evaluate.empty_threshold"), inputs=("quant",),
          version=4, enabled=_evaluate_quant_on,
          preflight=bench_loads),
]

# evaluate.virtual=true: the same "evaluate" stage, scoring the drop map on the base model.
# It applies prune.shared_ffn_alpha in memory, so that knob is part of its key.
EVALUATE_VIRTUAL = Stage("evaluate", run_evaluate_virtual, (*_EVAL_KEYS, "prune.shared_ffn_alpha"), inputs=("dropmap",),
                         external=model_input, version=4, enabled=lambda c: c.stages.evaluate, preflight=bench_loads)
VALIDATE = Stage("validate", run_validate, ("bench",), version=3)
# bench=divergence: the base model's continuations and top log-probs, which every evaluate reads.
# The calibration is in the key: its prompts are left out of the held-out set.
REFERENCE = Stage("reference", run_reference, ("bench", "model.dtype", "backend.enable_thinking", "calibration"),
                  external=model_input, enabled=lambda c: c.stages.evaluate, preflight=bench_loads)
# keep.drop_map in a run that computes no profile: the same "dropmap" stage, without the profile.
GIVEN_DROPMAP = Stage("dropmap", run_given_dropmap, ("keep",),
                      external=lambda c: {**dropmap_inputs(c), **model_input(c)},
                      enabled=lambda c: c.stages.dropmap, preflight=recipe_fits)


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


def stage_names() -> list[str]:
    """Every stage name of moeprune's pipelines, in table order (what optimized_metric may name)."""
    every = [*STAGES, EVALUATE_VIRTUAL, VALIDATE, REFERENCE, GIVEN_DROPMAP]
    return list(dict.fromkeys(s.name for s in every))


def _with_reference(stage: Stage) -> Stage:
    return dataclasses.replace(stage, inputs=(*stage.inputs, "reference"))


def _teacher_forced_stages(cfg: DictConfig, stages: list[Stage]) -> list[Stage]:
    """bench=divergence: the reference stage first, and every evaluate reads it. The objective runs
    inside a loaded model (backend=hf); a quantized file is judged by a generating bench."""
    if cfg.backend.name != "hf":
        raise MoePruneError(f"bench={cfg.bench.name} teacher-forces the model's own continuations: expected "
                            f"backend=hf, got {cfg.backend.name!r}")
    if _evaluate_quant_on(cfg):
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
    if not cfg.stages.profile:
        return False
    target = cfg.get("stage")
    if target in (None, "all", "profile", "dropmap"):
        return True
    given = {s.name: GIVEN_DROPMAP if s.name == "dropmap" else s for s in STAGES}  # its map reads no profile
    return target in given and "profile" in upstream(given, target)  # an unknown stage: the runner says so
