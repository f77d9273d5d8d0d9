"""A tiny Gemma 4 MoE that llama.cpp converts and quantizes like a real one.

Unlike conftest's tiny model, its hidden and expert-intermediate sizes are 256 (llama.cpp's K-quant
block), its full-attention head dim differs from the sliding one (the converter needs the per-layer
head dim recorded), and its embedding is padded past the tokenizer to a multiple of 64 as the toy
model's is.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_gguf_ready_gemma4(path: Path, seed: int = 0, num_experts: int = 8, layers: int = 2) -> Path:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from moeprune.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    vocab = (len(tok) + 63) // 64 * 64
    cfg = Gemma4TextConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, global_head_dim=128,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=vocab, enable_moe_block=True,
        num_experts=num_experts, top_k_experts=2, moe_intermediate_size=256, max_position_embeddings=256,
        sliding_window=64, layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
        pad_token_id=0, eos_token_id=1, bos_token_id=2, architectures=["Gemma4ForCausalLM"])
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(cfg).eval()
    with torch.no_grad():  # distinct per-layer expert scales so layer contributions differ
        for i, layer in enumerate(model.model.layers):
            layer.router.per_expert_scale.uniform_(0.5, 1.5).mul_(1 + i)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def toy_corpus(n: int = 16) -> dict[str, list[str]]:
    from moeprune.toy import world

    return {c: [t.prompt + t.answer for t in world.make_tasks(c, n, "calib", 0)] for c in world.CLASSES}
