"""The toy world: a deterministic generator of six task classes for the embedded toy MoE.

Every task is a short prompt whose answer is a short string; the model sees ``<bos> prompt`` and
must generate ``answer <eos>``. Prompts are at most 50 characters, answers at most 14. Each class
has its own one-token prompt tag (``ADD:``, ``BOOL:``, ``PY:``, ``SCI:``, ``TXT:``, ``PY+:``) and
its own format and characters, so that routing can become class-specific.

==================  ==================================================  ==========
class               prompt                                              answer
==================  ==================================================  ==========
generic_math        ``ADD:482+39=``                                     ``773``
generic_logic       ``BOOL:!(T&F)|(F&T)=``                              ``T``
generic_code        ``PY:a=4;b=a+3;print(b,b*2)``                       ``7 14``
generic_science     ``SCI:7kg?6950g=``                                  ``>``
generic_creative    ``TXT:rev planet=``                                 ``tenalp``
targeted_code_hard  ``PY+:a=7;b=3;c=a-b if a>b else a*b;print(c,c+4)``  ``4 8``
==================  ==================================================  ==========

* ``generic_math``: addition of two numbers of 1-3 digits, every number written least-significant
  digit first (``482`` is 284, ``773`` is 377), so that a small transformer can learn carries.
* ``generic_logic``: a boolean expression over ``T``/``F`` with ``&``, ``|``, ``!`` and
  parentheses (every binary sub-expression is parenthesized), answered ``T`` or ``F``.
* ``generic_code``: a straight-line Python program (two or three assignments with ``+ - *``, then
  ``print``; a value computed from another is printed with it); the answer is what the program
  prints, obtained by executing it when the task is generated.
* ``generic_science``: two quantities of one unit with SI prefixes (``m``, none, ``k``, ``M``)
  compared: ``<``, ``>`` or ``=``.
* ``generic_creative``: a string transform of a lowercase word chosen by an operator keyword
  (``rev``, ``sort``, ``dup``, ``rot``, ``swap``).
* ``targeted_code_hard``: longer Python programs with conditionals, loops (``sum(... for i in
  range(n))``), ``%``/``max``/``min`` and several printed values; executed for the answer.

Splits are assigned by hashing the prompt, so ``train``, ``calib``, ``val`` and ``test`` never
share a prompt whatever the seed; the held-out lists (``calib``, ``val``, ``test``) hold no
duplicates. ``val`` is what sweeps optimize on, so that ``test`` stays the split tables report.
It was carved out of the hash range that was ``train`` when the shipped toy model was trained
(``test`` and ``calib`` kept their ranges, so their task lists are unchanged): the shipped model's
training pool holds many ``val`` prompts (docs/toy-world.md has the counts), so ``val`` scores are
optimistic; it serves to choose among recipes without looking at ``test``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
from dataclasses import dataclass
from typing import Callable

CLASSES: tuple[str, ...] = (
    "generic_math",
    "generic_logic",
    "generic_code",
    "generic_science",
    "generic_creative",
    "targeted_code_hard",
)
SPLITS: tuple[str, ...] = ("train", "calib", "val", "test")

#: The one-token prompt tag of each class (the tokenizer merges each tag into a single token).
TAGS: dict[str, str] = {
    "generic_math": "ADD:",
    "generic_logic": "BOOL:",
    "generic_code": "PY:",
    "generic_science": "SCI:",
    "generic_creative": "TXT:",
    "targeted_code_hard": "PY+:",
}

#: Enough new tokens for every answer plus <eos> (the longest answer is 14 characters).
MAX_NEW_TOKENS: int = 16

#: A completion is cut at the first of these before it is compared.
END_MARKERS: tuple[str, ...] = ("\n", "<eos>", "<pad>")

# Split shares (percent of the hashed prompt space): test 10, calib 10, val 10, train 70.
_TEST_PCT, _CALIB_PCT, _VAL_PCT = 10, 10, 10


@dataclass(frozen=True)
class Task:
    cls: str
    prompt: str
    answer: str


def split_of(cls: str, prompt: str) -> str:
    """The split a prompt belongs to: a pure function of (class, prompt)."""
    h = int.from_bytes(hashlib.sha256(f"{cls}|{prompt}".encode()).digest()[:8], "big") % 100
    if h < _TEST_PCT:
        return "test"
    if h < _TEST_PCT + _CALIB_PCT:
        return "calib"
    if h < _TEST_PCT + _CALIB_PCT + _VAL_PCT:
        return "val"
    return "train"


def run_python(src: str) -> str:
    """Execute a toy program and return what it printed (trailing newline removed)."""
    buf = io.StringIO()
    env = {"__builtins__": {"print": print, "range": range, "sum": sum, "max": max, "min": min,
                            "abs": abs}}
    with contextlib.redirect_stdout(buf):
        exec(compile(src, "<toy>", "exec"), env)  # noqa: S102 - generated programs only
    return buf.getvalue().rstrip("\n")


# --------------------------------------------------------------------------- generators


def _lsd(n: int) -> str:
    return str(n)[::-1]


def _rand_int(rng: random.Random, max_digits: int) -> int:
    d = rng.randint(1, max_digits)
    return rng.randrange(0 if d == 1 else 10 ** (d - 1), 10**d)


def _gen_math(rng: random.Random) -> tuple[str, str]:
    a, b = _rand_int(rng, 3), _rand_int(rng, 3)
    return f"ADD:{_lsd(a)}+{_lsd(b)}=", _lsd(a + b)


def _logic_expr(rng: random.Random, depth: int, top: bool) -> str:
    if depth == 0 or (not top and rng.random() < 0.35):
        leaf = rng.choice("TF")
        return "!" + leaf if rng.random() < 0.25 else leaf
    left = _logic_expr(rng, depth - 1, False)
    right = _logic_expr(rng, depth - 1, False)
    s = f"{left}{rng.choice('&|')}{right}"
    if top:
        return s
    return ("!(" if rng.random() < 0.25 else "(") + s + ")"


def _eval_logic(expr: str) -> str:
    py = expr.replace("T", " True ").replace("F", " False ").replace("&", " and ")
    py = py.replace("|", " or ").replace("!", " not ")
    return "T" if eval(py, {"__builtins__": {}}) else "F"  # noqa: S307 - generated expressions only


def _gen_logic(rng: random.Random) -> tuple[str, str]:
    want = rng.choice("TF")  # balanced answers
    while True:
        expr = _logic_expr(rng, rng.choice((1, 2, 2)), True)
        ans = _eval_logic(expr)
        if ans == want:
            return f"BOOL:{expr}=", ans


def _gen_code(rng: random.Random) -> tuple[str, str]:
    d = lambda: rng.randint(0, 9)  # noqa: E731
    kind = rng.randrange(3)
    if kind == 0:
        src = f"a={d()};b={d()};print(a{rng.choice('+-*')}b)"
    else:
        o1, o2 = rng.choice(("++", "+-", "-+", "--", "+*", "-*", "*+", "*-"))
        if kind == 1:
            src = f"a={d()};b=a{o1}{d()};print(b,b{o2}{d()})"
        else:
            src = f"a={d()};b={d()};c=a{o1}b;print(c,c{o2}{rng.choice('ab')})"
    return "PY:" + src, run_python(src)


_PREFIXES = (("m", -3), ("", 0), ("k", 3), ("M", 6))
_UNITS = "gsJW"


def _quantity(n: int, prefix: str, unit: str) -> str:
    return f"{n}{prefix}{unit}"


def _gen_science(rng: random.Random) -> tuple[str, str]:
    unit = rng.choice(_UNITS)
    kind = rng.random()
    if kind < 0.2:  # equal: d<prefix> vs (1000*d)<one prefix lower>
        i = rng.randrange(len(_PREFIXES) - 1)
        d = rng.randint(1, 9)
        q1 = (d, i + 1)
        q2 = (d * 1000, i)
    elif kind < 0.6:  # close: same number of integer digits after scaling
        i1 = rng.randrange(len(_PREFIXES))
        n1 = _rand_int(rng, 4)
        n1 = max(n1, 1)
        v1 = n1 * 10 ** (_PREFIXES[i1][1] + 3)
        width = len(str(v1))
        cands = [i for i in range(len(_PREFIXES)) if 1 <= width - (_PREFIXES[i][1] + 3) <= 4]
        i2 = rng.choice(cands)
        w2 = width - (_PREFIXES[i2][1] + 3)
        lead = str(v1)[0] if rng.random() < 0.6 else str(rng.randint(1, 9))
        rest = "".join(str(rng.randint(0, 9)) for _ in range(w2 - 1))
        if rng.random() < 0.3:  # share more leading digits
            rest = (str(v1)[1:w2] + rest)[: w2 - 1]
        q1, q2 = (n1, i1), (int(lead + rest), i2)
    else:  # anything
        q1 = (max(_rand_int(rng, 4), 1), rng.randrange(len(_PREFIXES)))
        q2 = (max(_rand_int(rng, 4), 1), rng.randrange(len(_PREFIXES)))
    if rng.random() < 0.5:
        q1, q2 = q2, q1
    v1 = q1[0] * 10 ** (_PREFIXES[q1[1]][1] + 3)
    v2 = q2[0] * 10 ** (_PREFIXES[q2[1]][1] + 3)
    rel = "<" if v1 < v2 else ">" if v1 > v2 else "="
    s1 = _quantity(q1[0], _PREFIXES[q1[1]][0], unit)
    s2 = _quantity(q2[0], _PREFIXES[q2[1]][0], unit)
    return f"SCI:{s1}?{s2}=", rel


_TEXT_OPS: dict[str, Callable[[str], str]] = {
    "rev": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "dup": lambda w: "".join(c + c for c in w),
    "rot": lambda w: w[1:] + w[:1],
    "swap": lambda w: w[-1] + w[1:-1] + w[0],
}


def _gen_creative(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(sorted(_TEXT_OPS))
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
    return f"TXT:{op} {word}=", _TEXT_OPS[op](word)


def _gen_code_hard(rng: random.Random) -> tuple[str, str]:
    d = lambda lo=0: rng.randint(lo, 9)  # noqa: E731
    kind = rng.randrange(4)
    if kind == 0:  # conditional, two printed values
        o1, o2 = rng.sample("+-*", 2)
        cmp = rng.choice("<>")
        src = (f"a={d()};b={d()};c=a{o1}b if a{cmp}b else a{o2}b;"
               f"print(c,c{rng.choice('+-')}{d()})")
    elif kind == 1:  # loop through a generator expression, two printed values
        src = (f"a={d()};s=sum(a{rng.choice('+-*')}i for i in range({d(2)}));"
               f"print(s,s{rng.choice('+-')}{d()})")
    elif kind == 2:  # four statements, three printed values
        o1, o2, o3 = (rng.choice("+-*") for _ in range(3))
        if o1 == "*" and o2 == "*":
            o2 = "+"
        if "*" in (o1, o2) and o3 == "*":
            o3 = "-"
        src = f"a={d()};b=a{o1}{d()};c=b{o2}{d()};d=c{o3}a;print(b,c,d)"
    else:  # modulo and a conditional on it, or max/min
        if rng.random() < 0.5:
            src = (f"a={d()};b=a%{d(2)};print(b,a{rng.choice('+-*')}{d()} if b "
                   f"else a{rng.choice('+-')}{d()})")
        else:
            f1, f2 = rng.choice((("max", "min"), ("min", "max")))
            src = f"a={d()};b={d()};print({f1}(a,b){rng.choice('+-*')}{f2}(a,b))"
    return "PY+:" + src, run_python(src)


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "generic_math": _gen_math,
    "generic_logic": _gen_logic,
    "generic_code": _gen_code,
    "generic_science": _gen_science,
    "generic_creative": _gen_creative,
    "targeted_code_hard": _gen_code_hard,
}


def make_tasks(cls: str, n: int, split: str, seed: int = 0) -> list[Task]:
    """``n`` tasks of class ``cls`` from ``split`` ("train", "calib", "val" or "test").

    Deterministic in (cls, n, split, seed); a longer list extends a shorter one of the same seed.
    The split of a task is decided by hashing its prompt, so splits never share a prompt.
    ``calib``, ``val`` and ``test`` hold no duplicate prompts; ``train`` may repeat small-space
    prompts.
    """
    if cls not in _GENERATORS:
        raise ValueError(f"unknown toy class {cls!r}; expected one of {list(CLASSES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gen = _GENERATORS[cls]
    rng = random.Random(f"moeprune-toy|{cls}|{split}|{seed}")
    seen: set[str] | None = None if split == "train" else set()
    out: list[Task] = []
    tries, limit = 0, 1000 * n + 10_000
    while len(out) < n:
        tries += 1
        if tries > limit:
            raise ValueError(f"could not draw {n} distinct {split} tasks of {cls!r} (got {len(out)})")
        prompt, answer = gen(rng)
        if split_of(cls, prompt) != split:
            continue
        if seen is not None:
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append(Task(cls, prompt, answer))
    return out


def is_correct(task: Task, completion: str) -> bool:
    """Exact match after cutting ``completion`` at its first end marker and stripping whitespace."""
    cut = completion
    for marker in END_MARKERS:
        cut = cut.split(marker, 1)[0]
    return cut.strip() == task.answer.strip()
