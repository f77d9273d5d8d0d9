"""Importance matrix: llama-imatrix over a text made from the calibration corpus.

The text is every calibration text of every class, one per line, classes interleaved round-robin so
that each llama-imatrix chunk (imatrix_ctx tokens) sees several classes rather than one class per
stretch of the file. The text file and the imatrix are archived next to the quant and hashed in its
manifest.
"""

from __future__ import annotations

import os
from itertools import chain, zip_longest
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.quant.gguf_backend import import_llama_cpp
from moeprune.quant.gguf_tools import run_tool, staged
from moeprune.quant.toolchain import Toolchain

TEXT_FILE = "imatrix-calibration.txt"
IMATRIX_FILE = "imatrix.gguf"
LOG_FILE = "llama-imatrix.log"


def calibration_text(corpus: dict[str, list[str]]) -> str:
    if not corpus or not any(corpus.values()):
        raise MoePruneError("the calibration corpus is empty: expected texts to compute the importance matrix from")
    rows = chain.from_iterable(zip_longest(*corpus.values()))
    return "\n".join(r for r in rows if r is not None) + "\n"


def token_count(gguf: Path, text: str) -> int:
    """Tokens llama-imatrix sees in `text`: the GGUF's own vocabulary, BOS added, special tokens parsed."""
    llama_cpp = import_llama_cpp()
    try:
        vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    except ValueError as e:
        raise MoePruneError(f"llama.cpp could not load the vocabulary of {gguf}: {e}") from None
    try:
        return len(vocab.tokenize(text.encode(), add_bos=True, special=True))
    finally:
        vocab.close()


def compute(tc: Toolchain, f16_gguf: Path, text_file: Path, out: Path, ctx: int, threads: int = 0,
            log_file: Path | None = None) -> str:
    """Run llama-imatrix; returns its log. Raises with the tool's message on failure.

    The text must hold two chunks of `ctx` tokens. llama-imatrix checks that itself but exits before
    its logger flushes, so the reason is often lost: count first and say it here."""
    text = Path(text_file).read_text()
    n = token_count(f16_gguf, text[:-1] if text.endswith("\n") else text)  # -f drops the file's last newline
    if n < 2 * ctx:
        raise MoePruneError(f"the imatrix text {text_file} tokenizes to {n} tokens; llama-imatrix needs at least "
                            f"{2 * ctx} (two chunks of imatrix_ctx={ctx}): expected more calibration samples "
                            "or a smaller quant_tier.imatrix_ctx")
    with staged(out) as tmp:
        return run_tool([tc.tool("llama-imatrix"), "-m", f16_gguf, "-f", text_file, "-o", tmp, "-c", str(ctx),
                         "-b", str(ctx), "--no-ppl", "-t", str(threads or os.cpu_count() or 1),
                         "--output-format", "gguf", "--parse-special"], "llama-imatrix",
                        log_file=log_file or Path(out).with_name(LOG_FILE))
