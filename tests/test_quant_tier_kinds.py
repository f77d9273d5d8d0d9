"""A quant tier kind is one module under quant/ plus its preset: the stages, the preflight and
evaluate_quant find it by its kind, with no list of kinds to edit."""

from __future__ import annotations

import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from safetensors.torch import load_file

import moeprune.cli  # noqa: F401  (registers the schemas and the moeprune_pkg resolver)
from moeprune import artifacts, schema
from moeprune.errors import MoePruneError

# A new kind as its author writes it: the schema with its knobs, its hooks beside it.
KIND_MODULE = '''
"""The copy kind: the pruned checkpoint's weights as they are, under the tier's prefix."""

import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from moeprune import schema
from moeprune.errors import MoePruneError
from moeprune.checkpoint import parameter_count
from moeprune.quant.tiers import QuantTierConfig, kind_knob


@schema.schema("quant_tier", "copy")
@dataclass
class CopyTierConfig(QuantTierConfig):
    kind: str = kind_knob("copy")
    prefix: str = "copied"

    @classmethod
    def preflight(cls, tier):
        if tier.prefix == "refused":
            raise MoePruneError("quant_tier.prefix=refused: the copy kind refuses it before any stage")

    @classmethod
    def quantize(cls, tier, job):
        (src,) = Path(job.model_dir).glob("*.safetensors")
        out = Path(job.out_dir) / f"{tier.prefix}-{job.model_name}.safetensors"
        shutil.copyfile(src, out)
        params = parameter_count(job.model_dir)
        return {"file": out.name, "size_bytes": out.stat().st_size, "parameters": params,
                "bits_per_weight": 8 * out.stat().st_size / params, "tier": OmegaConf.to_container(tier),
                "corpus_texts": sum(len(t) for t in job.corpus().values())}
'''
PRESET = """defaults:
  - /schema/quant_tier/copy@_here_
  - _self_
name: copy16
"""


def _compose(overrides):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


@pytest.fixture
def copy_kind(tmp_path, monkeypatch):
    """quant/copy_tier.py (a directory added to the moeprune.quant package's path, as a file of the
    package would be found) and conf dir with quant_tier/copy16.yaml; nothing else is touched."""
    import moeprune.quant as quant

    package = tmp_path / "package"
    package.mkdir()
    (package / "copy_tier.py").write_text(KIND_MODULE)
    conf = tmp_path / "conf"
    (conf / "quant_tier").mkdir(parents=True)
    (conf / "quant_tier" / "copy16.yaml").write_text(PRESET)
    monkeypatch.setattr(schema, "_SCHEMAS", dict(schema._SCHEMAS))  # the kind is forgotten afterwards
    quant.__path__.append(str(package))
    try:
        schema.register()  # what composing registers: the schemas the walk finds
        yield conf
    finally:
        quant.__path__.remove(str(package))
        sys.modules.pop("moeprune.quant.copy_tier", None)


def test_a_tier_kind_written_as_one_module_and_one_preset_runs_the_quant_stage(copy_kind, tiny_gemma4, tmp_path):
    from moeprune.runner import Runner
    from moeprune.stages import STAGES

    base = [f"hydra.searchpath=[file://{copy_kind}]", "quant_tier=copy16", f"model.path={tiny_gemma4}",
            "calibration.samples_per_class=3", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(MoePruneError, match="quant_tier.prefix=refused: the copy kind refuses it before any stage"):
        Runner(_compose([*base, "quant_tier.prefix=refused"]), STAGES, tmp_path / "refused").run("quant")
    assert not (tmp_path / "cache").exists(), "the kind's preflight runs before the profile"

    cfg = _compose(base)
    results = Runner(cfg, STAGES, tmp_path / "run").run("quant")
    quant_dir = tmp_path / "run" / "quant"
    manifest = artifacts.read_json(quant_dir / "quant-manifest.json")
    assert manifest["tier"] == {"name": "copy16", "kind": "copy", "prefix": "copied"}
    assert manifest["file"] == f"copied-{manifest['model_name']}.safetensors" and manifest["corpus_texts"] > 0
    (src,) = (tmp_path / "run" / "prune" / "model").glob("*.safetensors")
    pruned = load_file(src)
    copied = load_file(quant_dir / manifest["file"])
    assert pruned.keys() == copied.keys() and all((pruned[k] == copied[k]).all() for k in pruned)
    assert "copy16" in (quant_dir / "README.md").read_text()  # the release card, as for every kind
    assert results["quant"]["size_bytes"] == (quant_dir / manifest["file"]).stat().st_size
    evaluate_quant = next(s for s in STAGES if s.name == "evaluate_quant")
    assert not evaluate_quant.enabled(cfg), "a kind without a scoring hook has no evaluate_quant"
    assert evaluate_quant.enabled(_compose(["quant_tier=q4_k_m"]))


def test_the_kinds_an_unknown_kind_is_refused_with_are_the_registered_ones(copy_kind):
    from moeprune import overrides

    with pytest.raises(MoePruneError, match=r"^quant_tier.kind=awq: Invalid value 'awq', expected one of "
                                            r"\[none, copy, gguf, nvfp4\]$"):
        overrides.check(["quant_tier.kind=awq"])
    overrides.check(["quant_tier.kind=copy"])  # a registered kind composes


def test_an_unknown_kind_is_refused_when_the_config_composes_and_before_any_tool_runs():
    from moeprune import overrides
    from moeprune.presets import quant_tier
    from moeprune.quant import tiers

    with pytest.raises(MoePruneError, match=r"^quant_tier.kind=awq: Invalid value 'awq', expected one of "
                                            r"\[none, gguf, nvfp4\]$"):
        overrides.check(["quant_tier.kind=awq"])
    tier = OmegaConf.merge(quant_tier("q4_k_m"), {"kind": "awq"})  # a config built in Python: the stage's check
    with pytest.raises(MoePruneError, match=r"quant_tier 'q4_k_m': kind='awq'; expected one of \('none', 'gguf', "
                                            r"'nvfp4'\)"):
        tiers.validate(tier)


def test_whether_the_quant_stages_run_is_the_tiers_kind_not_its_name(copy_kind):
    from moeprune.stages import STAGES, stages_for

    quant, evaluate_quant = (next(s for s in STAGES if s.name == n) for n in ("quant", "evaluate_quant"))
    renamed_none = _compose(["quant_tier=none", "quant_tier.name=plain"])
    assert not quant.enabled(renamed_none) and not evaluate_quant.enabled(renamed_none)
    renamed_gguf = _compose(["quant_tier=q4_k_m", "quant_tier.name=none"])
    assert quant.enabled(renamed_gguf) and evaluate_quant.enabled(renamed_gguf)
    # the objective (no evaluate_quant) beside a kind that has none either: nothing to refuse
    objective = [f"hydra.searchpath=[file://{copy_kind}]", "bench=divergence", "quant_tier=copy16"]
    assert "quant" in [s.name for s in stages_for(_compose(objective))]
    with pytest.raises(MoePruneError, match="has no evaluate_quant"):
        stages_for(_compose(["bench=divergence", "quant_tier=q4_k_m"]))


def test_evaluate_quant_refuses_a_manifest_whose_kind_has_no_scoring(tmp_path):
    from moeprune.stages.quant import eval_backend

    artifacts.write_json(tmp_path / "quant-manifest.json", {"tier": {"name": "plain", "kind": "none"}})
    with pytest.raises(MoePruneError, match=f"evaluate_quant: a none tier has no evaluate_quant; {tmp_path} is one"):
        eval_backend(_compose([]).backend, "cpu", tmp_path)
