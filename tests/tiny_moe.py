"""Tiny random checkpoints of every supported MoE family, built from real transformers configs.

`save_family(name, path, layout)` writes one; `load_family(name, path)` loads it the way a user
would. Layouts: "saved" is what transformers' `save_pretrained` writes (one tensor per expert for
Qwen3-MoE, Mixtral, OLMoE, Qwen3.5/Next, DeepSeek-V3, the Hub's layout; fused for Gemma 4 and
gpt-oss, also the Hub's), optionally in several shards; "fused" is the in-memory state dict
(`experts.gate_up_proj [E, 2I, H]`), which older exports and some tools write; "mxfp4" (gpt-oss
only) is the released gpt-oss layout, expert weights as MXFP4 `*_blocks` / `*_scales` (transformers
dequantizes them at load on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_gemma4_config

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             initializer_range=0.2)  # a wide init keeps router logits far from ties
QWEN35_TEXT = dict(SMALL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                   shared_expert_intermediate_size=24, layer_types=["linear_attention", "full_attention"],
                   linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)


def _config(name: str):
    import transformers as T

    if name == "gemma4":
        return T.Gemma4ForCausalLM, tiny_gemma4_config(vocab=96)
    if name == "gemma4_multimodal":
        vision = T.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=16, position_embedding_size=64, patch_size=4)
        return T.Gemma4ForConditionalGeneration, T.Gemma4Config(
            text_config=tiny_gemma4_config(vocab=96), vision_config=vision, image_token_id=5, boi_token_id=6,
            eoi_token_id=7, video_token_id=8, boa_token_id=9, audio_token_id=10, eoa_token_index=11,
            architectures=["Gemma4ForConditionalGeneration"])
    if name == "qwen3_moe":  # 3 layers, the middle one dense; renormalized top-k
        return T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(**dict(SMALL, num_hidden_layers=3), num_experts=8,
                                                       num_experts_per_tok=2, moe_intermediate_size=16,
                                                       intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1])
    if name == "mixtral":
        return T.MixtralForCausalLM, T.MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2,
                                                     intermediate_size=16)
    if name == "olmoe":  # top-k weights are plain softmax probabilities (no renormalization)
        return T.OlmoeForCausalLM, T.OlmoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2, intermediate_size=16,
                                                 norm_topk_prob=False)
    if name == "qwen3_5_moe":
        return T.Qwen3_5MoeForCausalLM, T.Qwen3_5MoeTextConfig(**QWEN35_TEXT)
    if name == "qwen3_5_moe_multimodal":
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                      num_position_embeddings=16)
        return T.Qwen3_5MoeForConditionalGeneration, T.Qwen3_5MoeConfig(
            text_config=QWEN35_TEXT, vision_config=vision, image_token_id=5, video_token_id=6,
            vision_start_token_id=7, vision_end_token_id=8)
    if name == "qwen3_next":
        return T.Qwen3NextForCausalLM, T.Qwen3NextConfig(**QWEN35_TEXT, norm_topk_prob=False)
    if name == "deepseek_v3":  # 16 experts in 4 groups of 4, 2 groups survive, first layer dense
        cfg = dict(SMALL, num_hidden_layers=3)
        cfg.pop("head_dim")
        return T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
            **cfg, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
            first_k_dense_replace=1, moe_intermediate_size=16, intermediate_size=48, kv_lora_rank=16,
            q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5)
    if name == "gpt_oss":
        return T.GptOssForCausalLM, T.GptOssConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2,
                                                   intermediate_size=32, sliding_window=16,
                                                   layer_types=["sliding_attention", "full_attention"])
    raise KeyError(name)


FAMILIES = ("gemma4", "gemma4_multimodal", "qwen3_moe", "mixtral", "olmoe", "qwen3_5_moe", "qwen3_5_moe_multimodal",
            "qwen3_next", "deepseek_v3", "gpt_oss")
MULTIMODAL = {"gemma4_multimodal", "qwen3_5_moe_multimodal"}


def build_family(name: str, seed: int = 0, **config_overrides):
    cls, config = _config(name)
    for key, value in config_overrides.items():  # e.g. vocab_size=384 to run the toy tokenizer through it
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # what init leaves constant would hide slicing mistakes: make it random
        for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
            if pname.endswith(("per_expert_scale",)):
                p.uniform_(0.5, 1.5)
            elif pname.endswith(("e_score_correction_bias", "router.bias", "_proj_bias")):
                p.uniform_(-0.5, 0.5)
    return model


def save_family(name: str, path: Path, layout: str = "saved", seed: int = 0, max_shard_size: str | None = None) -> Path:
    from safetensors.torch import save_file

    model = build_family(name, seed)
    path = Path(path)
    if layout == "saved":
        model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    elif layout == "fused":
        model.config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "mxfp4":
        _save_mxfp4(model, path, seed)
    else:
        raise ValueError(layout)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))  # an aux file to carry over
    return path


def _save_mxfp4(model, path: Path, seed: int) -> None:
    """gpt-oss as released: each fused expert weight [E, in, out] stored as 4-bit codes packed two
    per byte, `_blocks [E, out, in/32, 16]`, with one power-of-two scale per 32 inputs, `_scales
    [E, out, in/32]` (random codes: any byte is a valid pair of FP4 values)."""
    from safetensors.torch import save_file

    model.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = t.shape
            state[name + "_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
            state[name + "_scales"] = torch.randint(122, 126, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        else:
            state[name] = t.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))


def load_family(name: str, path: Path):
    import transformers as T

    cls = T.AutoModelForImageTextToText if name in MULTIMODAL else T.AutoModelForCausalLM
    kw = {}
    if "quantization_config" in json.loads((Path(path) / "config.json").read_text()):  # MXFP4 on CPU
        kw["quantization_config"] = T.Mxfp4Config(dequantize=True)
    return cls.from_pretrained(path, dtype=torch.float32, **kw).eval()
