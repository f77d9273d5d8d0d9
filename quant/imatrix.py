"""Importance matrix: llama-imatrix over a text made from the calibration corpus.

The text is every calibration text of every class, one per line, classes interleaved round-robin so
that each llama-imatrix chunk (imatrix_ctx tokens) sees several classes rather than one class per
stretch of the file. The text file and the imatrix are archived next to the quant and hashed in its
manifest.
"""

from __future__ import annotations

import os
import re
import subprocess
from itertools import chain, zip_longest
from pathlib import Path

from moeprune.errors import MoePruneError
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


def token_count(tc: Toolchain, gguf: Path, text: bytes) -> int:
    """Tokens llama-imatrix sees in `text`, counted by llama-tokenize from the same llama.cpp build:
    the GGUF's own vocabulary (loaded alone, no weights), its BOS rule, the text verbatim (llama-imatrix
    leaves a -f file's escape sequences as they are; llama-tokenize would process them without
    --no-escape), special-token strings (a chat template's turn markers) read as the special tokens
    they are: llama-tokenize parses them by default and llama-imatrix runs with --parse-special."""
    proc = subprocess.run([str(tc.tool("llama-tokenize")), "-m", str(gguf), "--stdin", "--show-count", "--ids",
                           "--no-escape", "--log-disable"], input=text, capture_output=True)
    found = re.search(rb"Total number of tokens: (\d+)", proc.stdout)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).decode(errors="replace")[-2000:]
        raise MoePruneError(f"llama-tokenize could not read the vocabulary of {gguf} (exit {proc.returncode}): {tail}")
    return int(found.group(1))


def compute(tc: Toolchain, f16_gguf: Path, text_file: Path, out: Path, ctx: int, threads: int = 0,
            log_file: Path | None = None) -> str:
    """Run llama-imatrix; returns its log. Raises with the tool's message on failure.

    The text must hold two chunks of `ctx` tokens. llama-imatrix checks that itself but exits before
    its logger flushes, so the reason is often lost: count first and say it here."""
    text = Path(text_file).read_bytes()  # bytes: the tool reads \r\n as it is
    n = token_count(tc, f16_gguf, text[:-1] if text.endswith(b"\n") else text)  # -f drops the file's last newline
    if n < 2 * ctx:
        raise MoePruneError(f"the imatrix text {text_file} tokenizes to {n} tokens; llama-imatrix needs at least "
                            f"{2 * ctx} (two chunks of imatrix_ctx={ctx}): expected more calibration samples "
                            "or a smaller quant_tier.imatrix_ctx")
    with staged(out) as tmp:
        return run_tool([tc.tool("llama-imatrix"), "-m", f16_gguf, "-f", text_file, "-o", tmp, "-c", str(ctx),
                         "-b", str(ctx), "--no-ppl", "--parse-special", "-t", str(threads or os.cpu_count() or 1),
                         "--output-format", "gguf"], "llama-imatrix",
                        log_file=log_file or Path(out).with_name(LOG_FILE))
