"""Shared fixtures: tiny random MoE checkpoints built from real transformers configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Session fixtures of the sweep / tracking tests (one profiled model, one study for all of them).
pytest_plugins = ["sweep_support"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def tiny_gemma4_config(num_experts: int = 8, top_k: int = 2, layers: int = 2, vocab: int = 384):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=vocab, enable_moe_block=True,
        num_experts=num_experts, top_k_experts=top_k, moe_intermediate_size=32, max_position_embeddings=128,
        sliding_window=32, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2, architectures=["Gemma4ForCausalLM"],
    )


def save_tiny_gemma4(path: Path, seed: int = 0, **kw) -> Path:
    from transformers import Gemma4ForCausalLM

    from moeprune.toy.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(tiny_gemma4_config(**kw)).eval()
    with torch.no_grad():  # random per-expert scales so slicing mistakes show up in the logits
        for layer in model.model.layers:
            layer.router.per_expert_scale.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return Path(path)


@pytest.fixture
def tiny_gemma4(tmp_path) -> Path:
    return save_tiny_gemma4(tmp_path / "tiny_gemma4")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
