"""Release files written next to each quant: a model card (README.md) and, for GGUF, an Ollama Modelfile.

Everything in the card is read from artifacts on disk (the quant manifest, the surgery metadata,
eval summaries), so it can be re-rendered after evaluation with the scores filled in. Nothing is
uploaded anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from moeprune import artifacts

# Gemma 4's turn format (<|turn>role ... <turn|>) as an Ollama Go template, and the default sampler of
# the reference family's Ollama pages.
GEMMA4_TEMPLATE = (
    "<bos>{{ if .System }}<|turn>system\n{{ .System }}<turn|>\n{{ end }}"
    "{{ if .Prompt }}<|turn>user\n{{ .Prompt }}<turn|>\n{{ end }}"
    "<|turn>model\n{{ .Response }}<turn|>\n"
)
GEMMA4_STOPS = ("<turn|>", "<|tool_response>")
CHAT_SAMPLER = {"temperature": 0.6, "top_p": 0.95, "repeat_penalty": 1.15, "repeat_last_n": 256}
# A model without a chat template (the toy model) is a plain completion model scored greedily.
RAW_TEMPLATE = "{{ .Prompt }}"
RAW_SAMPLER = {"temperature": 0, "top_k": 1, "repeat_penalty": 1.0}


def _tokenizer_info(model_dir: Path) -> tuple[bool, str | None, set[str]]:
    """(has a chat template, eos token, the vocabulary's special/added tokens)."""
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    has_template = bool(cfg.get("chat_template")) or (Path(model_dir) / "chat_template.jinja").is_file()
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    tokens: set[str] = set()
    tj = Path(model_dir) / "tokenizer.json"
    if tj.is_file():
        tokens = {t["content"] for t in json.loads(tj.read_text()).get("added_tokens", [])}
    return has_template, eos, tokens


def modelfile(gguf_name: str, model_dir: Path, num_ctx: int) -> str:
    has_template, eos, tokens = _tokenizer_info(model_dir)
    if has_template and "<|turn>" in tokens:
        template, stops, sampler = GEMMA4_TEMPLATE, list(GEMMA4_STOPS), CHAT_SAMPLER
    else:
        template, stops, sampler = RAW_TEMPLATE, [eos] if eos else [], RAW_SAMPLER
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER {k} {v}" for k, v in sampler.items()]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def model_card(manifest: dict, prune_meta: dict | None, scores: dict[str, dict] | None = None,
               title: str | None = None) -> str:
    tier = manifest["tier"]
    title = title or f"{manifest.get('model_name', 'model')} — {tier['name']}"
    out = [f"# {title}", ""]
    if prune_meta:
        out += [f"Expert-pruned {prune_meta.get('architecture', '')} checkpoint: "
                f"{prune_meta['num_experts_before']} → {prune_meta['num_experts_after']} experts per MoE layer, "
                f"quantized to {tier['name']} by moeprune.", ""]
        recipe = prune_meta.get("recipe") or {}
        if recipe:
            out += ["## Recipe", "", "| knob | value |", "|---|---|"]
            for group, value in recipe.items():
                if isinstance(value, dict):
                    for k, v in value.items():
                        if not k.startswith("_"):
                            out.append(f"| {group}.{k} | {json.dumps(v)} |")
                else:
                    out.append(f"| {group} | {json.dumps(value)} |")
            out.append(f"| shared_ffn_alpha | {prune_meta.get('shared_ffn_alpha')} |")
            out.append("")
        out += ["## Experts kept per layer", "", "| layer | kept | dropped ids |", "|---|---|---|"]
        for layer, kept in prune_meta.get("keep", {}).items():
            dropped = prune_meta.get("dropped", {}).get(layer, [])
            out.append(f"| {layer} | {len(kept)}/{prune_meta['num_experts_before']} | {dropped} |")
        out.append("")
    out += ["## This file", "", "| | |", "|---|---|"]
    if "file" in manifest:
        out.append(f"| file | `{manifest['file']}` |")
    out.append(f"| parameters | {manifest['parameters']:,} |")
    out.append(f"| size | {_fmt_bytes(manifest['size_bytes'])} ({manifest['size_bytes']:,} bytes) |")
    out.append(f"| bits per weight | {manifest['bits_per_weight']:.2f} (size × 8 / parameters) |")
    if manifest.get("type"):
        out.append(f"| llama.cpp type | {manifest['type']} |")
    im = manifest.get("imatrix")
    out.append(f"| imatrix | {'`' + im['file'] + '` sha256 ' + im['sha256'][:16] if im else 'none'} |")
    tmap = manifest.get("tensor_type_map")
    if tmap and "layer_types" in tmap:
        out.append(f"| ContribDynamic map | `{tmap['file']}` (layer types {tmap['layer_types']}) |")
    elif tmap:
        n = len(tmap["lines"])
        out.append(f"| tensor type overrides | `{tmap['file']}` ({n} pattern{'' if n == 1 else 's'}) |")
    if manifest.get("fallbacks"):
        out.append(f"| shape fallbacks | {len(manifest['fallbacks'])} tensors (see quant-manifest.json) |")
    out.append("")
    if scores:
        out += ["## Scores", "", "| bench | n | score | ± stderr |", "|---|---|---|---|"]
        for bench, s in sorted(scores.items()):
            out.append(f"| {bench} | {s.get('n')} | {100 * s['score']:.2f}% | {100 * s.get('stderr', 0):.2f} |")
        out.append("")
    out += ["Every number above is read from `quant-manifest.json`, `expert_drop_metadata.json` and the eval "
            "`summary.json` files next to it.", ""]
    return "\n".join(out)


def write(out_dir: Path, manifest: dict, model_dir: Path, scores: dict[str, dict] | None = None,
          num_ctx: int = 4096) -> list[str]:
    """README.md (+ Modelfile for GGUF) into out_dir; returns the names written."""
    out_dir = Path(out_dir)
    meta_path = Path(model_dir) / "expert_drop_metadata.json"
    prune_meta = artifacts.read_json(meta_path) if meta_path.is_file() else None
    written = ["README.md"]
    _write_text(out_dir / "README.md", model_card(manifest, prune_meta, scores))
    if manifest.get("file", "").endswith(".gguf"):
        _write_text(out_dir / "Modelfile", modelfile(manifest["file"], model_dir, num_ctx))
        written.append("Modelfile")
    return written


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
