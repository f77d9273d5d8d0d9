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
    path = Path(model_dir) / "config.json"
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise MoePruneError(f"{path} is unreadable ({type(e).__name__}: {e}): expected a Hugging Face "
                            "config.json") from None
    if not isinstance(config, dict):
        raise MoePruneError(f"{path} holds a JSON {type(config).__name__}: expected a JSON object (a Hugging Face "
                            "config.json)")
    return config


ACCELERATE_MIN = "1.1.0"  # transformers' own floor for the MXFP4 loader


def check_loadable(model_dir: Path) -> None:
    """What transformers needs beyond the core install to load this checkpoint: an MXFP4 one (gpt-oss
    as released) goes through accelerate, which only the `mxfp4` extra installs; without it
    transformers stops with an ImportError after the run has started."""
    from importlib import metadata

    from packaging.version import Version

    quant = read_config(model_dir).get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4":
        return
    try:
        import accelerate  # noqa: F401

        found = metadata.version("accelerate")
    except (ImportError, metadata.PackageNotFoundError):
        found = None
    if found is None or Version(found) < Version(ACCELERATE_MIN):
        have = "is not installed" if found is None else f"is {found}"
        raise MoePruneError(f"{Path(model_dir) / 'config.json'}: quantization_config.quant_method=mxfp4 loads through "
                            f"accelerate, which {have}: expected accelerate>={ACCELERATE_MIN} "
                            '(pip install -e ".[mxfp4]")')


def check_device(device: str) -> None:
    """model.device before anything loads onto it: a name torch knows, a GPU that is there."""
    kind, _, index = str(device).partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise MoePruneError(f"model.device={device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= int(index or 0):
            raise MoePruneError(f"model.device={device}: this machine has {count} CUDA device(s): expected "
                                "model.device=auto or cpu" + (f", or cuda:0..{count - 1}" if count else ""))
    if kind == "mps" and not torch.backends.mps.is_available():
        raise MoePruneError(f"model.device={device}: MPS is not available here: expected model.device=auto or cpu")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(model_dir: Path, dtype: str = "float32", device: str = "auto"):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise MoePruneError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    check_loadable(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    return model.to(pick_device(device)).eval()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
