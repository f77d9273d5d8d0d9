"""The toy model's tokenizer: a character-level BPE in the Gemma / SentencePiece style.

* ids 0-3: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2 (the Gemma convention), ``<unk>`` 3;
* ids 4-259: the 256 byte tokens ``<0x00>`` ... ``<0xFF>`` (``byte_fallback``: any character
  outside the vocabulary is spelt as its UTF-8 bytes);
* then ``▁`` (U+2581, which stands for a space, as in SentencePiece), newline and every printable
  ASCII character;
* then a few real BPE merges that make each class's prompt tag (``ADD:``, ``BOOL:``, ...) one
  token (llama.cpp refuses a Gemma 4 vocabulary with no merges; the tags occur nowhere else in
  the toy world, so merges never cross a prompt/answer boundary);
* then ``<unused0>`` ... ``<unused10>``, never produced by tokenization, up to 384 = a multiple of
  64 = the model's ``vocab_size`` (llama.cpp's converter cuts the embedding to the tokenizer's
  length and requires it to equal the number of tokens it writes).

The post-processor prepends ``<bos>`` (``add_bos_token``); the saved tokenizer pads on the left,
as batched generation needs. ``tokenizer.json`` follows the layout llama.cpp's Gemma 4 converter
reads through gguf-py's ``LlamaHfVocab`` (a ``BPE`` model with ``byte_fallback`` and a
``Sequence`` decoder).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPACE = "\u2581"
VOCAB_MULTIPLE = 64

# Each tag becomes one token through a chain of merges (see moeprune.toy.world.TAGS).
_TAG_MERGES: tuple[tuple[str, str], ...] = (
    ("A", "D"), ("AD", "D"), ("ADD", ":"),
    ("B", "O"), ("BO", "O"), ("BOO", "L"), ("BOOL", ":"),
    ("P", "Y"), ("PY", ":"), ("PY", "+"), ("PY+", ":"),
    ("S", "C"), ("SC", "I"), ("SCI", ":"),
    ("T", "X"), ("TX", "T"), ("TXT", ":"),
)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {PAD: PAD_ID, EOS: EOS_ID, BOS: BOS_ID, UNK: UNK_ID}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in [SPACE, "\n"] + [chr(c) for c in range(33, 127)]:
        vocab[ch] = len(vocab)
    for a, b in _TAG_MERGES:
        vocab.setdefault(a + b, len(vocab))
    # Pad with never-produced tokens (as Gemma's <unusedN>) to a multiple of 64, so that the
    # tokenizer's length equals the model's vocab_size: llama.cpp's converter cuts the embedding
    # to the tokenizer's length and requires it to match the number of tokens it writes.
    i = 0
    while len(vocab) % VOCAB_MULTIPLE:
        vocab[f"<unused{i}>"] = len(vocab)
        i += 1
    return vocab, list(_TAG_MERGES)


def build_backend() -> Tokenizer:
    """The raw ``tokenizers.Tokenizer``."""
    vocab, merges = _vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, BOS_ID)])
    tok.add_special_tokens([PAD, EOS, BOS, UNK])
    return tok


def build_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer (deterministic); ``save_dir`` also writes it with ``save_pretrained``."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        add_bos_token=True, add_eos_token=False,
        padding_side="left", truncation_side="left",
        model_max_length=256, clean_up_tokenization_spaces=False,
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (
        PAD_ID, EOS_ID, BOS_ID, UNK_ID)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def encode_task(tok: PreTrainedTokenizerFast, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(``<bos>`` + prompt ids, answer ids + ``<eos>``): the training/scoring layout."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
    return p, a
