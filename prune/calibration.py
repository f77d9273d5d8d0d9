"""Calibration corpora: classes of prompts, tokenized into weighted passes.

A corpus is {class: [Pass]}. A pass is one sequence the profiler runs as one forward (a "pass" in
the reference tool's sense: its per-pass statistics are taken over it). Each class lists sources:

- ``jsonl``: one JSON object per line; ``field`` holds the prompt string or a chat ``messages``
  list of ``{role, content}``;
- ``text``: one prompt per non-blank line;
- ``toy``: the toy world's ``calib`` split of a class (prompt + answer, or ``field: prompt``);
- ``datasets``: ``datasets.load_dataset(path, subset, split=split)[field]``: a local dir (hashed
  into the profile's cache key), or a Hub id read from the Hugging Face cache, or downloaded where
  there is network (keyed by id, subset and split only: use a local copy to pin the content).

Every source feeds a tier (``calibration.tiers``): its prompt token limit, its weight and what a
longer prompt does: ``truncate`` keeps the first ``max_tokens`` tokens and warns, ``window`` splits
the prompt into consecutive ``max_tokens`` windows (each its own pass), ``error`` refuses. A tier
whose ``max_tokens`` plus ``generate_tokens`` exceeds the model's context is refused up front.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeprune.config import Overflow, SourceKind
from moeprune.errors import MoePruneError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from moeprune.config import CalibrationSourceConfig, CalibrationTierConfig

# omegaconf and the schema (hydra) are imported where configs are read: `Pass` and the readers
# stay importable on a bare torch + transformers machine (the GPU benchmarks)

log = logging.getLogger("moeprune")

# the schema's choices (moeprune/config.py), written once; a Python-made config is checked against them
KINDS = tuple(m.value for m in SourceKind)
OVERFLOW = tuple(m.value for m in Overflow)
Prompt = Any  # a string, or a chat message list (jsonl / datasets with chat_template on)


@dataclass(frozen=True)
class Pass:
    ids: tuple[int, ...]
    tier: str
    weight: float
    start: int = 0  # positions before this are forwarded (context) but not counted


# ---- config validation -------------------------------------------------------------------------
def _typed(node, schema, where: str):
    """Merge one user node onto its dataclass schema: a misspelt key or a wrong type names `where`."""
    from omegaconf import OmegaConf

    try:  # resolve in place first: a preset's paths interpolate ${calibration.data_dir}
        node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except Exception as e:  # omegaconf's ConfigKeyError / ValidationError, with the key in the text
        raise MoePruneError(f"{where}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None


def tiers_of(cfg: DictConfig) -> dict[str, CalibrationTierConfig]:
    from moeprune.config import CalibrationTierConfig

    tiers = {name: _typed(t, CalibrationTierConfig, f"calibration.tiers.{name}") for name, t in cfg.tiers.items()}
    for name, t in tiers.items():
        if t.overflow not in OVERFLOW:
            raise MoePruneError(f"calibration.tiers.{name}.overflow={t.overflow!r}: expected one of {OVERFLOW}")
        if t.max_tokens < 1 or not t.weight > 0:
            raise MoePruneError(f"calibration.tiers.{name}: expected max_tokens >= 1 and weight > 0, "
                                f"got max_tokens={t.max_tokens}, weight={t.weight}")
    return tiers


def sources_of(cfg: DictConfig, tiers: dict) -> dict[str, list[CalibrationSourceConfig]]:
    from moeprune.config import CalibrationSourceConfig

    if not cfg.classes:
        raise MoePruneError(f"calibration={cfg.get('name')}: no classes; expected calibration.classes "
                            "to map each class name to a list of sources")
    check_data_dir(cfg)
    out = {}
    for cls, sources in cfg.classes.items():
        if not sources:
            raise MoePruneError(f"calibration class {cls!r} is empty: expected at least one source")
        out[cls] = []
        for i, node in enumerate(sources):
            src = _typed(node, CalibrationSourceConfig, f"calibration.classes.{cls}[{i}]")
            if src.kind not in KINDS:
                raise MoePruneError(f"calibration.classes.{cls}[{i}].kind={src.kind!r}: expected one of {KINDS}")
            if src.tier not in tiers:
                raise MoePruneError(f"calibration.classes.{cls}[{i}].tier={src.tier!r}: "
                                    f"expected one of calibration.tiers: {sorted(tiers)}")
            if src.kind in ("jsonl", "text", "datasets") and not src.path:
                raise MoePruneError(f"calibration.classes.{cls}[{i}]: kind {src.kind} needs a path")
            out[cls].append(src)
    return out


def check_data_dir(cfg: DictConfig) -> None:
    """A preset whose paths interpolate ${calibration.data_dir} needs it set (null would read 'None/...')."""
    from omegaconf import OmegaConf

    if cfg.get("data_dir") is not None:
        return
    raw = OmegaConf.to_container(cfg.classes, resolve=False)
    uses = re.compile(r"\$\{\s*calibration\.data_dir\s*\}")
    users = [cls for cls, sources in raw.items() for src in sources or [] if uses.search(str(src.get("path", "")))]
    if users:
        raise MoePruneError(f"calibration={cfg.get('name')} reads its files from calibration.data_dir, which is not "
                            f"set: expected calibration.data_dir=<the dir holding the files of {sorted(set(users))}>")


def calibration_files(cfg: DictConfig) -> dict[str, Path]:
    """The local files a corpus reads, for the stage's cache key (an edited corpus re-profiles).
    The sources are checked here, before any hashing, as the profile stage will read them."""
    files = {}
    for cls, sources in sources_of(cfg, tiers_of(cfg)).items():
        for i, src in enumerate(sources):
            path = Path(src.path).expanduser()
            if src.kind in ("jsonl", "text") or (src.kind == "datasets" and path.exists()):
                files[f"calibration.{cls}[{i}]"] = path
            if src.kind in ("jsonl", "text") and path.is_file():
                check_utf8(path, f"calibration.classes.{cls}[{i}]")
    return files


def check_utf8(path: Path, where: str) -> None:
    """A calibration file the readers would fail to decode halfway (Latin-1, UTF-16), named with the
    line of its first bad byte. Read in blocks: files of many MB cost well under a second."""
    import codecs

    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                at = min(max(e.start, 0), len(block) - 1)  # an error may start in the previous block's tail
                line = lines + block[:at].count(b"\n")
                raise MoePruneError(f"{where}: {path}:{line} is not UTF-8 (byte 0x{block[at]:02x} at offset "
                                    f"{offset + at}): expected a UTF-8 text file; convert it, e.g. "
                                    f"iconv -f latin1 -t utf-8") from None
            offset, lines = offset + len(block), lines + block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise MoePruneError(f"{where}: {path} ends inside a UTF-8 character: expected a UTF-8 text file") from None


# ---- reading prompts ---------------------------------------------------------------------------
def _read_jsonl(path: Path, field: str) -> list[Prompt]:
    if not path.is_file():
        raise MoePruneError(f"calibration file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoePruneError(f"{path}:{n} is not JSON ({e.msg}): expected one JSON object per line "
                                    "(JSONL); use kind: text for plain text") from None
            if not isinstance(row, dict) or field not in row:
                raise MoePruneError(f"{path}:{n}: expected a JSON object with key {field!r}, got "
                                    f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
            out.append(_check_prompt(row[field], f"{path}:{n}"))
    return out


def _read_text(path: Path) -> list[str]:
    if not path.is_file():
        raise MoePruneError(f"calibration file not found: {path}")
    return [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]


def _read_toy(cls: str, src: CalibrationSourceConfig, n: int | None, seed: int) -> list:
    from moeprune.toy import world

    name = src.path or cls
    if name not in world.CLASSES:
        raise MoePruneError(f"calibration class {cls!r}: unknown toy class {name!r}; "
                            f"expected one of {list(world.CLASSES)}")
    if n is None:
        raise MoePruneError(f"calibration class {cls!r}: a toy source needs a count (limit or samples_per_class)")
    if src.field not in ("text", "prompt"):
        raise MoePruneError(f"calibration class {cls!r}: toy field={src.field!r}: "
                            "expected text (prompt + answer) or prompt")
    tasks = world.make_tasks(name, n, "calib", seed)
    # (prompt, answer) pairs: the toy world knows where the answer starts (score_tokens=completion)
    return [(t.prompt, t.answer) if src.field == "text" else t.prompt for t in tasks]


def _read_datasets(src: CalibrationSourceConfig, n: int | None) -> list[Prompt]:
    try:
        import datasets
    except ImportError:
        raise MoePruneError("calibration source kind datasets needs the `datasets` package: "
                            "pip install 'moeprune[calib]'") from None
    try:
        ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    except Exception as e:  # not cached / not a dataset: the library's own message says which
        raise MoePruneError(f"calibration dataset {src.path!r} (subset {src.subset}, split {src.split}) "
                            f"could not be loaded: {type(e).__name__}: {e}") from None
    if src.field not in ds.column_names:
        raise MoePruneError(f"calibration dataset {src.path!r}: no column {src.field!r}; columns: {ds.column_names}")
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    return [_check_prompt(p, f"{src.path}[{i}]") for i, p in enumerate(ds[src.field])]


def _check_prompt(p: Any, where: str) -> Prompt:
    if isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, dict) and "content" in m for m in p)):
        return p
    raise MoePruneError(f"{where}: expected a prompt string or a list of chat messages {{role, content}}, "
                        f"got {type(p).__name__}")


def read_prompts(cls: str, src: CalibrationSourceConfig, n: int | None, seed: int) -> list[Prompt]:
    if src.kind == "toy":
        return _read_toy(cls, src, n, seed)
    if src.kind == "datasets":
        return _read_datasets(src, n)
    path = Path(src.path).expanduser()
    prompts = _read_jsonl(path, src.field) if src.kind == "jsonl" else _read_text(path)
    return prompts if n is None else prompts[:n]


def calibration_texts(cfg: DictConfig) -> set[str]:
    """Every prompt the corpus can profile, as text (a chat as its JSON): the held-out prompts of the
    divergence objective must not be among them. Each source is read whole, so a prompt past
    samples_per_class counts too (toy sources: the calib split, disjoint from val and test anyway)."""
    out = set()
    for cls, srcs in sources_of(cfg, tiers_of(cfg)).items():
        for src in srcs:
            if src.kind == "toy":
                continue
            for p in read_prompts(cls, src, None, cfg.seed):
                out.add(p if isinstance(p, str) else json.dumps(p))
    return out


# ---- tokenizing --------------------------------------------------------------------------------
def encode(tokenizer, prompt: Prompt, chat_template: bool, template_kwargs: dict) -> list[int]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise MoePruneError("calibration.chat_template=true but the tokenizer has no chat template: "
                                "expected a tokenizer_config with chat_template, or set chat_template=false")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list):
        raise MoePruneError("a calibration prompt is a chat message list: set calibration.chat_template=true")
    return tokenizer(prompt)["input_ids"]


def fit(ids: list[int], tier: CalibrationTierConfig, where: str) -> list[list[int]]:
    """The passes one prompt makes under its tier's token limit."""
    m = tier.max_tokens
    if len(ids) <= m:
        return [ids]
    if tier.overflow == "error":
        raise MoePruneError(f"{where}: prompt of {len(ids)} tokens exceeds the tier's max_tokens={m}; "
                            "expected shorter prompts, or overflow truncate / window")
    if tier.overflow == "truncate":
        return [ids[:m]]
    return [ids[i:i + m] for i in range(0, len(ids), m)]


def build_corpus(cfg: DictConfig, tokenizer, max_context: int | None = None) -> dict[str, list[Pass]]:
    """Read, template and tokenize every class's prompts into passes (before any generation)."""
    tiers = tiers_of(cfg)
    sources = sources_of(cfg, tiers)
    if max_context is not None:
        for name, t in tiers.items():
            if t.max_tokens + cfg.generate_tokens > max_context:
                raise MoePruneError(
                    f"calibration.tiers.{name}.max_tokens={t.max_tokens} + generate_tokens={cfg.generate_tokens} "
                    f"exceeds the model's context ({max_context} tokens): expected at most {max_context}")
    if cfg.score_tokens not in ("all", "completion"):
        raise MoePruneError(f"calibration.score_tokens={cfg.score_tokens!r}: expected all or completion")
    completion = cfg.score_tokens == "completion"
    corpus: dict[str, list[Pass]] = {}
    for cls, srcs in sources.items():
        passes, budget, truncated = [], cfg.samples_per_class, 0
        for i, src in enumerate(srcs):
            n = src.limit if budget is None else min(budget, src.limit if src.limit is not None else budget)
            if n == 0:
                continue
            tier = tiers[src.tier]
            prompts = read_prompts(cls, src, n, cfg.seed)
            for j, p in enumerate(prompts):
                prefix = None
                if isinstance(p, tuple):
                    prefix, p = p[0], p[0] + p[1]
                ids = encode(tokenizer, p, cfg.chat_template, dict(cfg.chat_template_kwargs))
                start = 0
                if completion and cfg.generate_tokens == 0:
                    if prefix is None:
                        raise MoePruneError(
                            f"calibration class {cls!r} source {i}: score_tokens=completion needs to know where "
                            f"the answer starts: expected a toy source with its answer (not field: prompt), "
                            f"generate_tokens > 0, or calibration.score_tokens=all")
                    # the prompt's last position already predicts the first answer token
                    start = len(encode(tokenizer, prefix, cfg.chat_template, dict(cfg.chat_template_kwargs))) - 1
                pieces = fit(ids, tier, f"calibration class {cls!r} source {i} prompt {j}")
                truncated += tier.overflow == "truncate" and len(ids) > tier.max_tokens
                passes += [Pass(tuple(piece), src.tier, tier.weight, start if k == 0 else 0)
                           for k, piece in enumerate(pieces)]
            if budget is not None:
                budget -= len(prompts)
        if truncated:
            log.warning("calibration class %r: %d prompts truncated to their tier's max_tokens", cls, truncated)
        if not passes:
            raise MoePruneError(f"calibration class {cls!r} is empty: its sources gave no prompts; "
                                "expected at least one")
        corpus[cls] = passes
    return corpus


# ---- self-generated continuations --------------------------------------------------------------
def continue_greedy(model, corpus: dict[str, list[Pass]], n: int, batch_size: int, tokenizer,
                    score_completion: bool = False) -> dict[str, list[Pass]]:
    """Each pass extended by the model's own greedy continuation of up to n tokens (stopping after
    end-of-sequence), as the reference profiles prompt + 128 generated tokens. Batched by length
    with left padding, as generation needs."""
    import torch

    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: dict[str, list[Pass]] = {}
    for cls, passes in corpus.items():
        done: list[Pass | None] = [None] * len(passes)
        order = sorted(range(len(passes)), key=lambda i: len(passes[i].ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(passes[i].ids) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, width - len(passes[i].ids):] = torch.tensor(passes[i].ids)
                mask[row, width - len(passes[i].ids):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                                     min_new_tokens=0, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=eos)
            for row, i in enumerate(chunk):
                new = gen[row, width:].tolist()
                if eos in new:
                    new = new[:new.index(eos) + 1]
                p = passes[i]
                start = len(p.ids) - 1 if score_completion else p.start
                done[i] = Pass(p.ids + tuple(new), p.tier, p.weight, start)
        out[cls] = done
    return out
