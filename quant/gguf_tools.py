"""HF checkpoint -> F16 GGUF (llama.cpp's converter) -> quantized GGUF (llama-quantize).

Every output is written under a temporary name in its final directory and renamed only when the
tool succeeded, so a failed converter or quantizer never leaves a .gguf behind; the error carries
the tool's own last lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.quant.toolchain import Toolchain

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_FALLBACK_RE = re.compile(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                          r".*?-> falling back to\s+(\S+)")
_INSPECT = Path(__file__).with_name("gguf_inspect.py")
_ERROR_LINE = re.compile(r"^[\d.]+ E ", re.MULTILINE)  # common logger: "<time> E <message>"


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temp path beside `final`; renamed to `final` on success, removed on any error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = artifacts.mkstemp(final, suffix=".partial")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def run_tool(cmd: list[str], what: str, env: dict | None = None, log_file: Path | None = None) -> str:
    """Run a llama.cpp tool; on failure raise with its own message (the last lines it printed).

    Tools built on llama.cpp's common logger (llama-imatrix, llama-cli) log from a worker thread and
    exit(1) without flushing it, so their error line is sometimes lost, to a pipe or a --log-file
    alike. For those (`log_file` given) a failed run whose log holds no error line is repeated, up to
    3 runs: the failures that lose it happen at start-up (loading, tokenizing) and repeat exactly.
    """
    args = [str(c) for c in cmd] + (["--log-file", str(log_file)] if log_file is not None else [])
    for _ in range(3 if log_file is not None else 1):
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        log = proc.stdout + proc.stderr
        if log_file is not None and Path(log_file).is_file():
            log = Path(log_file).read_text(errors="replace")
        if proc.returncode == 0 or _ERROR_LINE.search(log):
            break
    if proc.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-15:])
        if log_file is not None and not _ERROR_LINE.search(log):
            tail = "(its logger lost the error line on exit, 3 runs in a row; the log ends:)\n" + tail
        raise MoePruneError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return log


def check_model_dir(model_dir: Path) -> None:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MoePruneError(f"{model_dir} has no config.json: expected a Hugging Face checkpoint dir")
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise MoePruneError(f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): the GGUF converter "
                            "embeds the vocabulary, so save the tokenizer next to the weights")
    arch = json.loads((model_dir / "config.json").read_text()).get("architectures")
    if not arch:
        raise MoePruneError(f"{model_dir}/config.json has no 'architectures': the converter picks its model "
                            "class from it (expected e.g. [\"Gemma4ForCausalLM\"])")


def convert(tc: Toolchain, model_dir: Path, out: Path, outtype: str = "f16", model_name: str | None = None) -> str:
    """The 16-bit GGUF every tier is quantized from (general.name = model_name or the dir's name)."""
    check_model_dir(model_dir)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=Path(out).parent) as work, staged(out) as tmp:
        src = _trim_padded_vocab(Path(model_dir), Path(work))
        return run_tool([sys.executable, tc.converter, src, "--outtype", outtype, "--outfile", tmp,
                         "--model-name", model_name or Path(model_dir).name],
                        f"convert_hf_to_gguf.py on {model_dir}", env=tc.python_env())


def _trim_padded_vocab(model_dir: Path, work: Path) -> Path:
    """A checkpoint the Gemma converter reads right, when the embedding is padded past the tokenizer.

    llama.cpp's Gemma converters cut token_embd to len(vocab) + len(added_tokens) of tokenizer.json,
    counting added tokens that are also in the vocab twice; with an embedding padded beyond the
    tokenizer (e.g. to a multiple of 64) the GGUF then has more embedding rows than tokens and llama.cpp
    refuses to load it. Rows past the tokenizer are ids no text ever maps to, so we convert from a
    staging copy (symlinks, plus the embedding shard and config rewritten) cut to the tokenizer's size.
    """
    from safetensors.torch import load_file, save_file

    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        return model_dir
    tok = json.loads(tok_path.read_text())
    ids = set(tok.get("model", {}).get("vocab", {}).values()) | {t["id"] for t in tok.get("added_tokens", [])}
    n_tok = max(ids) + 1 if ids else 0
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    vocab = int(text.get("vocab_size") or 0)
    if not n_tok or vocab <= n_tok:
        return model_dir
    index = model_dir / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    shards = {weight_map.get(k, "model.safetensors") for k in weight_map} or {"model.safetensors"}
    rewrite = set()
    for shard in shards:
        from safetensors import safe_open

        with safe_open(str(model_dir / shard), "pt") as st:
            if any(("embed_tokens" in k or k.endswith("lm_head.weight")) and st.get_slice(k).get_shape()[0] == vocab
                   for k in st.keys()):
                rewrite.add(shard)
    for p in model_dir.iterdir():
        if p.is_file() and p.name not in rewrite and p.name != "config.json":
            (work / p.name).symlink_to(p.resolve())
    for shard in rewrite:
        tensors = load_file(str(model_dir / shard))
        for k, t in tensors.items():
            if ("embed_tokens" in k or k.endswith("lm_head.weight")) and t.shape[0] == vocab:
                tensors[k] = t[:n_tok].contiguous()
        save_file(tensors, str(work / shard), metadata={"format": "pt"})
    text["vocab_size"] = n_tok
    (work / "config.json").write_text(json.dumps(config, indent=2))
    return work


def quantize(tc: Toolchain, src: Path, out: Path, ftype: str, *, imatrix: Path | None = None,
             tensor_type_file: Path | None = None, token_embedding_type: str | None = None,
             output_tensor_type: str | None = None, threads: int = 0) -> dict:
    """llama-quantize src -> out; returns the tool log and the tensors that fell back to another type."""
    cmd = [tc.tool("llama-quantize")]
    if imatrix:
        cmd += ["--imatrix", imatrix]
    if tensor_type_file:
        cmd += ["--tensor-type-file", tensor_type_file]
    if token_embedding_type:
        cmd += ["--token-embedding-type", token_embedding_type]
    if output_tensor_type:
        cmd += ["--output-tensor-type", output_tensor_type]
    with staged(out) as tmp:
        log = run_tool([*cmd, src, tmp, ftype, str(threads or os.cpu_count() or 1)], f"llama-quantize {ftype}")
    return {"log": log, "fallbacks": parse_fallbacks(log)}


def parse_fallbacks(log: str) -> dict[str, dict]:
    """Tensors llama-quantize gave another type because their rows do not fit the block size."""
    return {m[1]: {"ncols": int(m[2]), "block": int(m[3]), "wanted": m[4], "got": m[5]}
            for m in _FALLBACK_RE.finditer(log)}


def inspect(tc: Toolchain, path: Path) -> dict[str, dict]:
    """name -> {type, shape, elements, bytes} for every tensor of a GGUF, read by the vendored gguf-py."""
    out = run_tool([sys.executable, _INSPECT, path], f"reading {path}", env=tc.python_env())
    return json.loads(out.strip().splitlines()[-1])
