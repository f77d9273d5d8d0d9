"""The quantized file and its release card (moeprune/stages/quant.py wires them into the runner).

quantize: the pruned checkpoint + `quant_tier` -> the quant its kind's module makes (a GGUF through
llama.cpp, an NVFP4A16 checkpoint, ...: quant/tiers.py kinds()), with its manifest and release files
(model card, Ollama Modelfile).
scored_card: the card again, with the score evaluate_quant measured through the quantized file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from moeprune import artifacts
from moeprune.dropmap import DropMap
from moeprune.profile import Profile
from moeprune.quant import release, tiers

DROP_METADATA = "expert_drop_metadata.json"
MAX_EVAL_CTX = 4096  # KV cache for evaluation; the model's own context when smaller


def _keep_lists(model_dir: Path) -> dict[int, list[int]]:
    """The experts each layer kept, from the metadata surgery wrote (the map it applied)."""
    meta = Path(model_dir) / DROP_METADATA
    if not meta.is_file():
        return {}
    data = artifacts.read_json(meta)
    return DropMap.parse(data["dropped"], num_experts=data["num_experts_before"], top_k=0).kept()


def _context_length(model_dir: Path) -> int:
    cfg = artifacts.read_json(Path(model_dir) / "config.json")
    cfg = cfg.get("text_config", cfg)
    return int(cfg.get("max_position_embeddings") or MAX_EVAL_CTX)


def corpus_texts(calibration: DictConfig, model_dir: Path) -> dict[str, list[str]]:
    """The calibration passes the profile ran, as text (class -> texts): the imatrix and NVFP4
    calibration see the same tokens, chat templates included. The leading BOS is dropped since
    llama-imatrix and the tokenizer add their own; other special tokens (turn markers) are written
    as their strings, which llama-imatrix (--parse-special) reads back as the special tokens."""
    from moeprune.models import load_tokenizer
    from moeprune.prune.calibration import build_corpus

    tok = load_tokenizer(model_dir)
    out = {}
    for cls, passes in build_corpus(calibration, tok).items():
        texts = []
        for p in passes:
            ids = list(p.ids)
            if ids and ids[0] == tok.bos_token_id:
                ids = ids[1:]
            texts.append(tok.decode(ids, skip_special_tokens=False))
        out[cls] = texts
    return out


@dataclass(frozen=True)
class QuantJob:
    """What a kind's `quantize` hook is handed besides the tier: the pruned checkpoint and where its
    quant goes; the calibration corpus and the profile are read only if the kind asks for them."""

    calibration: DictConfig
    model_name: str  # with -<experts>e when every layer kept as many
    model_dir: Path
    profile_dir: Path | None
    out_dir: Path
    cache_dir: Path  # for what a kind keeps across tiers of one checkpoint (the GGUF base, the imatrix)
    keep: dict[int, list[int]]  # the experts each layer kept

    def corpus(self) -> dict[str, list[str]]:
        return corpus_texts(self.calibration, self.model_dir)

    def profile(self) -> Profile:
        return Profile.load(self.profile_dir)


def quantize(tier: DictConfig, calibration: DictConfig, model_name: str, model_dir: Path, profile_dir: Path | None,
             out_dir: Path, cache_dir: Path) -> dict:
    """The pruned checkpoint at `model_dir` as `tier`, by its kind's `quantize` hook (calibration
    from the `calibration` corpus; what a kind keeps across tiers under `cache_dir`)."""
    tiers.validate(tier)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    keep = _keep_lists(model_dir)
    experts = {len(v) for v in keep.values()}
    model_name = f"{model_name}-{experts.pop()}e" if len(experts) == 1 else model_name
    job = QuantJob(calibration, model_name, model_dir, profile_dir, out_dir, Path(cache_dir).expanduser(), keep)
    manifest = tiers.kind_of(tier.kind, f"quant_tier {tier.name!r}").quantize(tier, job)
    manifest["model_name"] = model_name
    manifest["context_length"] = _context_length(model_dir)
    artifacts.write_json(out_dir / "quant-manifest.json", manifest)
    if (model_dir / DROP_METADATA).is_file():
        shutil.copyfile(model_dir / DROP_METADATA, out_dir / DROP_METADATA)
    release.write(out_dir, manifest, model_dir, num_ctx=manifest["context_length"])
    return {"file": manifest.get("file"), "type": manifest.get("type"), "tier": tier.name,
            "size_bytes": manifest["size_bytes"],
            "bits_per_weight": manifest["bits_per_weight"], "imatrix": bool(manifest.get("imatrix")),
            "fallbacks": len(manifest.get("fallbacks") or {})}


def scored_card(quant_dir: Path, out_dir: Path, metrics: dict) -> dict:
    """The release card again, with the score measured through the quantized file; returns the metrics
    with the quant's size and bits per weight."""
    manifest = artifacts.read_json(Path(quant_dir) / "quant-manifest.json")
    meta = Path(quant_dir) / DROP_METADATA
    card = release.model_card(manifest, artifacts.read_json(meta) if meta.is_file() else None,
                              {metrics["bench"]: metrics})
    (Path(out_dir) / "README.md").write_text(card)  # out_dir is the stage's temp dir: renamed when done
    return {**metrics, "size_bytes": manifest["size_bytes"], "bits_per_weight": manifest["bits_per_weight"],
            "tier": manifest["tier"]["name"],
            "num_experts": artifacts.read_json(meta)["num_experts_after"] if meta.is_file() else None}
