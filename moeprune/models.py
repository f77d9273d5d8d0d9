"""Loading models and their configs from a local dir or a Hugging Face id (offline cache)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(path: str, revision: str | None = None) -> Path:
    """A local checkpoint dir, or the snapshot of a Hugging Face id already in the local cache."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise MoePruneError(f"model dir {p} has no config.json: expected a Hugging Face checkpoint dir")
        return p
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise MoePruneError(f"model not found: {path!r} is neither a checkpoint dir nor a Hugging Face id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends: nothing to download here
        raise MoePruneError(
            f"model {path!r} is not in the local Hugging Face cache and cannot be downloaded here; "
            f"download it elsewhere or pass a local dir as model.path ({type(e).__name__})"
        ) from None


def read_config(model_dir: Path) -> dict:
    with open(Path(model_dir) / "config.json") as f:
        return json.load(f)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(model_dir: Path, dtype: str = "float32", device: str = "auto"):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise MoePruneError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    return model.to(pick_device(device)).eval()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
