"""Release files: the model card is built from the artifacts, the Modelfile from the tokenizer."""

from __future__ import annotations

import json

from moeprune.quant import release

MANIFEST = {
    "tier": {"name": "cd_q4_k_m"}, "model_name": "toy_gemma4-12e", "file": "toy_gemma4-12e-Q4_K_M.gguf",
    "type": "Q4_K_M", "parameters": 4_000_000, "size_bytes": 2_500_000, "bits_per_weight": 5.0,
    "imatrix": {"file": "imatrix.gguf", "sha256": "ab" * 32},
    "tensor_type_map": {"file": "tensor-types.txt", "layer_types": {"0": "q5_k", "1": "q3_k"}},
    "fallbacks": {"blk.0.ffn_down_exps.weight": {"wanted": "q4_K", "got": "q5_0"}},
}
META = {"architecture": "gemma4", "num_experts_before": 16, "num_experts_after": 12, "shared_ffn_alpha": 1.2,
        "keep": {"0": list(range(12)), "1": list(range(4, 16))}, "dropped": {"0": [12, 13, 14, 15], "1": [0, 1, 2, 3]},
        "recipe": {"strategy": {"_target_": "x", "name": "max", "alpha": 2.0}, "keep": {"experts_per_layer": 12}}}


def test_model_card_reads_every_number_from_the_artifacts():
    card = release.model_card(MANIFEST, META, {"toy_suite": {"n": 600, "score": 0.875, "stderr": 0.0135}})
    assert "16 → 12 experts per MoE layer" in card
    assert "| strategy.alpha | 2.0 |" in card and "_target_" not in card and "| shared_ffn_alpha | 1.2 |" in card
    assert "| 1 | 12/16 | [0, 1, 2, 3] |" in card
    assert "| parameters | 4,000,000 |" in card and "2.50 MB (2,500,000 bytes)" in card and "5.00" in card
    assert "`imatrix.gguf` sha256 abababab" in card and "tensor-types.txt" in card and "1 tensors" in card
    assert "| toy_suite | 600 | 87.50% | 1.35 |" in card
    assert "## Scores" not in release.model_card(MANIFEST, META)
    overrides = {**MANIFEST, "tensor_type_map": {"file": "tensor-types.txt", "lines": [r"blk\.0\.attn_q\.weight=q8_0"]}}
    assert "| tensor type overrides | `tensor-types.txt` (1 pattern) |" in release.model_card(overrides, META)


def test_modelfile_for_a_raw_completion_model(tmp_path):
    from moeprune.toy.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path)
    text = release.modelfile("m-Q4_K_M.gguf", tmp_path, 256)
    assert text.splitlines()[0] == "FROM ./m-Q4_K_M.gguf"
    assert 'TEMPLATE """{{ .Prompt }}"""' in text
    assert "PARAMETER temperature 0" in text and "PARAMETER num_ctx 256" in text
    assert 'PARAMETER stop "<eos>"' in text


def test_modelfile_for_a_gemma4_chat_model(tmp_path):
    from moeprune.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|turn>", "<turn|>"]})
    tok.chat_template = "{% for m in messages %}<|turn>{{ m.role }}\n{{ m.content }}<turn|>\n{% endfor %}"
    tok.save_pretrained(tmp_path)
    text = release.modelfile("g.gguf", tmp_path, 4096)
    assert "<|turn>user\n{{ .Prompt }}<turn|>" in text and "<|turn>model\n" in text
    assert 'PARAMETER stop "<turn|>"' in text and "PARAMETER temperature 0.6" in text


def test_write_puts_card_and_modelfile_next_to_the_gguf(tmp_path):
    from moeprune.toy.tokenizer import build_tokenizer

    model = tmp_path / "model"
    build_tokenizer().save_pretrained(model)
    (model / "expert_drop_metadata.json").write_text(json.dumps(META))
    out = tmp_path / "quant"
    out.mkdir()
    assert release.write(out, MANIFEST, model, num_ctx=256) == ["README.md", "Modelfile"]
    assert "12/16" in (out / "README.md").read_text()
    assert "FROM ./toy_gemma4-12e-Q4_K_M.gguf" in (out / "Modelfile").read_text()
    assert release.write(out, {**MANIFEST, "file": "model"}, model) == ["README.md"]  # NVFP4: no Modelfile
