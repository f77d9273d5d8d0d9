"""Load a GGUF through llama-cpp-python and generate greedily: the in-process check that a quant
loads and runs (the pipeline's evaluate_quant stage goes through llama-server instead, via the
evaluation backends; a test holds the two to the same greedy completions).

llama-cpp-python is in the `gguf` extra. When the installed package carries no compiled library
(installed with CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF", which skips a second llama.cpp
build), it loads libllama.so from the toolchain build of the same llama.cpp version.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import metadata
from pathlib import Path

from moeprune.errors import MoePruneError


def import_llama_cpp():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        raise MoePruneError("llama-cpp-python is not installed: expected `pip install -e '.[gguf]'` to load GGUF files")
    from moeprune.quant import toolchain

    bundled = Path(spec.origin).parent / "lib" / "libllama.so"
    if not os.environ.get("LLAMA_CPP_LIB_PATH") and not bundled.exists():
        version = metadata.version("llama-cpp-python")
        if version != toolchain.VERSION:
            raise MoePruneError(f"llama-cpp-python {version} has no compiled library and the toolchain builds "
                                f"llama.cpp {toolchain.VERSION}: expected llama-cpp-python=={toolchain.VERSION}")
        os.environ["LLAMA_CPP_LIB_PATH"] = str(toolchain.ensure().bin_dir)
    import llama_cpp

    return llama_cpp


def generate(gguf_path: Path, prompts: list[str], max_new_tokens: int, n_ctx: int = 0, threads: int = 0) -> list[str]:
    """Greedy completions (temperature 0) with the GGUF's own tokenizer and BOS rule."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise MoePruneError(f"GGUF file not found: {gguf_path}")
    llama_cpp = import_llama_cpp()
    try:
        llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(), verbose=False)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise MoePruneError(f"llama.cpp could not load {gguf_path}: {e}") from None
    try:
        return [llm.create_completion(p, max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                      repeat_penalty=1.0)["choices"][0]["text"] for p in prompts]
    finally:
        llm.close()
