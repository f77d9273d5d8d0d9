"""Answer extraction shared by the benches: code from chat fences, numbers, multiple-choice letters,
math expressions (math-verify). Each returns what it extracted ("" when nothing), so the per-sample
record shows exactly what was compared."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_LANG_TAGS = {
    "python": {"python", "py", "python3"},
    "js": {"javascript", "js", "node"},
    "rust": {"rust", "rs"},
    "java": {"java"},
}


def defines_function(name: str) -> re.Pattern:
    """A line that defines function `name` itself (not `name_helper`)."""
    return re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", re.M)


ANY_FUNCTION = re.compile(r"^\s*(?:async\s+)?def\s+\w+\s*\(", re.M)


def extract_code(text: str, language: str = "python", defines: re.Pattern | None = None) -> tuple[str, bool]:
    """The program in a completion: the last fenced block tagged with the language, else the last
    untagged block, else the text itself. With `defines` (a pattern such as defines_function("add")),
    the last block it matches wins, so a solution followed by an "example usage" block is still the
    one scored. A fence left open by truncation counts up to the end. Returns (code, fenced)."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    tagged = [b for t, b in blocks if t in _LANG_TAGS.get(language, {language})]
    untagged = [b for t, b in blocks if not t]
    chosen = tagged or untagged or [b for _, b in blocks]
    if defines is not None:
        chosen = [b for b in chosen if defines.search(b)] or chosen
    if chosen:
        return chosen[-1], True
    return text, False


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL_PATTERNS = (
    re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)"),
    re.compile(r"\\boxed\{\s*\\?\$?(-?\d[\d,]*(?:\.\d+)?)\s*\}"),
    re.compile(r"answer is[:\s]*\**\s*\\?\$?(-?\d[\d,]*(?:\.\d+)?)", re.I),
)


def _norm_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    return format(d.normalize(), "f") if d == d.to_integral() or "." in s else s


def extract_number(text: str) -> str:
    """Flexible numeric extraction (GSM8K, AIME): an explicit final answer (`#### N`, `\\boxed{N}`,
    `the answer is N`) when present, else the last number in the text."""
    for pat in _FINAL_PATTERNS:
        found = pat.findall(text)
        if found:
            return _norm_number(found[-1])
    found = _NUMBER.findall(text)
    return _norm_number(found[-1]) if found else ""


def numbers_equal(a: str, b: str) -> bool:
    if not a or not b:
        return False
    try:
        return Decimal(_norm_number(a)) == Decimal(_norm_number(b))
    except InvalidOperation:
        return a == b


def extract_choice(text: str, letters: str = "ABCD") -> str:
    """Flexible multiple-choice extraction (GPQA, ARC): the last `answer is (X)` / `Answer: X`,
    else the last parenthesized `(X)`, else a bare single-letter reply."""
    L = re.escape(letters)
    explicit = re.findall(rf"answer\s*(?:is|:)?\s*[:\s]*\**\s*\(?([{L}])\b\)?", text, re.I)
    explicit = [x for x in explicit if x in letters]  # `re.I` also matched lowercase words like "a"
    if explicit:
        return explicit[-1]
    paren = re.findall(rf"\(([{L}])\)", text)
    if paren:
        return paren[-1]
    bare = text.strip().strip("*.").strip()
    return bare if len(bare) == 1 and bare in letters else ""


def math_equal(gold: str, completion: str) -> tuple[bool, str]:
    """math-verify equivalence of the completion's final answer with the gold answer."""
    from math_verify import parse, verify

    gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", parsing_timeout=None)
    pred = parse(completion, parsing_timeout=None)
    extracted = str(pred[-1]) if pred else ""
    return bool(pred) and bool(verify(gold_parsed, pred, timeout_seconds=None)), extracted
