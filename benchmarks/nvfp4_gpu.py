"""NVFP4A16 on a CUDA GPU: quantize a small Gemma 4-architecture MoE with modelopt, export, reload.

    python benchmarks/nvfp4_gpu.py OUT_DIR [MODEL_DIR]

MODEL_DIR defaults to the shipped toy model when it exists, else a random Gemma 4 MoE (hidden 256,
4 layers, 16 experts top-2, expert intermediate 256) with the toy tokenizer is built first.
Calibration: the toy world's calib split. Prints the quant manifest (sizes, bpw, timings, reload
agreement) as JSON and writes it to OUT_DIR/nvfp4-manifest.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def random_gemma4(path: Path) -> Path:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from moeprune.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    vocab = (len(tok) + 63) // 64 * 64
    cfg = Gemma4TextConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, global_head_dim=128, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab, enable_moe_block=True, num_experts=16, top_k_experts=2,
        moe_intermediate_size=256, max_position_embeddings=256, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        architectures=["Gemma4ForCausalLM"])
    torch.manual_seed(0)
    Gemma4ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _dump_export(export: Path) -> None:
    from safetensors import safe_open

    for f in sorted(export.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if "layers.1." not in k and "layers.2." not in k and "layers.3." not in k:
                    print(k, st.get_slice(k).get_dtype(), st.get_slice(k).get_shape())
    if (export / "config.json").is_file():
        print((export / "config.json").read_text())


def main() -> None:
    from moeprune.quant import nvfp4
    from moeprune.toy import world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="where the quant, its manifest and (if built) the random model go")
    ap.add_argument("model_dir", type=Path, nargs="?", default=None, help="default: the shipped toy model")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    toy = Path(__file__).resolve().parents[1] / "moeprune" / "toy" / "model"
    model_dir = args.model_dir or (toy if (toy / "config.json").is_file() else None)
    if model_dir is None:
        model_dir = random_gemma4(out / "random_gemma4")
    corpus = {c: [t.prompt + t.answer for t in world.make_tasks(c, 64, "calib", 0)] for c in world.CLASSES}
    t0 = time.perf_counter()
    try:
        manifest = nvfp4.produce(model_dir, out / "nvfp4", corpus, samples_per_class=32, max_tokens=64)
    except Exception:
        _dump_export(out / "nvfp4" / "model")  # what the exporter wrote, to see why the reload failed
        raise
    manifest["wall_s"] = round(time.perf_counter() - t0, 2)
    manifest["model_dir"] = str(model_dir)
    manifest["device"] = torch.cuda.get_device_name()
    manifest["exported_files"] = sorted(p.name for p in (out / "nvfp4" / "model").iterdir())
    from safetensors import safe_open

    with safe_open(str(next((out / "nvfp4" / "model").glob("*.safetensors"))), "pt") as st:
        keys = list(st.keys())
        manifest["tensor_sample"] = {k: [str(st.get_slice(k).get_dtype()), st.get_slice(k).get_shape()]
                                     for k in keys if ".experts.0." in k and "layers.0." in k}
        manifest["tensor_count"] = len(keys)
    text = json.dumps(manifest, indent=2)
    (out / "nvfp4-manifest.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
