"""The profile stage's work: build the calibration corpus, pick whole-model or layer-wise
profiling, profile, save. The runner caches the result by content hash."""

from __future__ import annotations

from pathlib import Path

import torch

from moeprune.adapters import adapter_for
from moeprune.artifacts import hash_json, write_json
from moeprune.errors import MoePruneError
from moeprune.models import load_model, load_tokenizer, pick_device, read_config
from moeprune.prune.calibration import build_corpus, continue_greedy
from moeprune.prune.profile import profile_model
from moeprune.prune.profile.batches import corpus_meta
from moeprune.prune.profile.layerwise import profile_layerwise

MODEL_CONFIG_FILE = "model_config.json"  # the profiled model's config.json, as read


def check_corpus(model_dir: Path, calibration) -> None:
    """Tokenize the calibration corpus as the profile will (its tiers' max_tokens with overflow=error,
    the model's context, chat templates): the preflight calls it when the profile is to be built, so
    a prompt that does not fit is said before the run dir is made."""
    config = read_config(model_dir)
    build_corpus(calibration, load_tokenizer(model_dir),
                 adapter_for(config).text_config(config).get("max_position_embeddings"))


def profile_checkpoint(model_dir: Path, out_dir: Path, calibration, settings, dtype: str, device: str,
                       cache_dir: Path) -> dict:
    """Profile `model_dir` over the `calibration` corpus with the profile `settings` (the
    calibration and profile config nodes); layer-wise work dirs default to under `cache_dir`."""
    config = read_config(model_dir)
    adapter = adapter_for(config)
    adapter.num_experts(config)  # a family's dense sibling (no expert count) fails here, by name
    tok = load_tokenizer(model_dir)
    corpus = build_corpus(calibration, tok, adapter.text_config(config).get("max_position_embeddings"))
    torch_device = pick_device(device)
    mode = settings.mode if settings.mode != "auto" else choose_mode(model_dir, torch_device,
                                                                     settings.device_memory_fraction)
    cal = calibration
    if mode == "whole":
        model = load_model(model_dir, dtype, device)
        if cal.generate_tokens:
            corpus = continue_greedy(model, corpus, cal.generate_tokens, cal.batch_size, tok,
                                     cal.score_tokens == "completion")
        profile = profile_model(model, adapter, corpus, cal.batch_size, cal.batch_tokens, tok.pad_token_id,
                                settings.neuron_energy, settings.on_nonfinite, settings.progress)
    else:
        if cal.generate_tokens:
            raise MoePruneError("calibration.generate_tokens needs the whole model on the device: expected "
                                "generate_tokens=0 with profile.mode=layerwise (or a model that fits)")
        run_key = hash_json([corpus_meta(corpus)["corpus_sha256"], str(model_dir), dtype, settings.neuron_energy])
        work = Path(settings.work_dir or Path(cache_dir).expanduser() / "profile_layerwise") / run_key[:16]
        profile = profile_layerwise(model_dir, adapter, corpus, work, dtype, torch_device, cal.batch_size,
                                    cal.batch_tokens, tok.pad_token_id, settings.neuron_energy,
                                    settings.on_nonfinite, settings.hidden_ram_bytes, settings.progress)
    # top_k: a drop map built later from this profile alone (profile.path=, no model) checks its keep count
    profile.meta.update(mode=mode, model_dir=str(model_dir), dtype=dtype, top_k=adapter.top_k(config))
    profile.save(out_dir)
    # ...and the model's config beside it, so that such a map follows every rule of the architecture
    # (group-limited routing included) exactly as with the model on disk
    write_json(out_dir / MODEL_CONFIG_FILE, config)
    return {"classes": profile.classes, "tokens": sum(profile.tokens.values()), "mode": mode}


def choose_mode(model_dir: Path, device: torch.device, fraction: float) -> str:
    """auto: layer-wise when the checkpoint's weights exceed `fraction` of the device's memory."""
    if device.type != "cuda":
        return "whole"
    size = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    total = torch.cuda.get_device_properties(device).total_memory
    return "layerwise" if size > fraction * total else "whole"
