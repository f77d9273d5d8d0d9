"""multipl_e: MultiPL-E's HumanEval translations (Rust, Java, JavaScript; `bench.n` problems each),
chat mode, pass@1, compiled and run in the sandbox. The score is the macro mean over languages.

MultiPL-E is a completion benchmark: the program is `prompt + completion + tests`, where the
completion stops at the row's own stop tokens and the tests close the function (Rust, Java) and
call it. A chat reply restates the function, so we take the reply's code after the line that
defines the prompt's function and cut it at the first stop token: exactly the completion MultiPL-E
expects. Helpers or imports the reply adds outside that function are not carried over.
A pass needs the program to exit 0 *and* print a line the tests print after their last assertion:
a random nonce made for that run, so a reply that exits early (`process::exit(0)`, `System.exit(0)`,
`process.exit(0)`) fails. The tests share the program's process here, so a program written to find
the nonce in its own source or binary could still fake it (docs/evaluation.md, threat model).
Languages whose toolchain (rustc, javac/java, node) is missing are skipped and named in the summary.
Java problems that import `org.javatuples` need that jar on CLASSPATH. No reference solutions exist.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import List, Optional

from moeprune import artifacts, schema
from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox, sandbox_isolation
from moeprune.evaluate.benches.base import Bench, CodeBenchConfig
from moeprune.evaluate.data import load_rows
from moeprune.evaluate.scoring import extract_code
from moeprune.evaluate.types import Sample, Verdict

log = logging.getLogger("moeprune")
DATASET_CODES = {"rust": "rs", "java": "java", "js": "js"}  # sandbox language -> MultiPL-E suffix
DISPLAY = {"rust": "Rust", "java": "Java", "js": "JavaScript"}


def _function_name(signature: str) -> str:
    names = re.findall(r"(\w+)\s*\(", signature)
    if not names:
        raise MoePruneError(f"multipl_e: cannot find a function name in the prompt line {signature!r}")
    return names[0]


def definition_of(prompt: str) -> re.Pattern:
    """The prompt function's definition line as a reply restates it: the word before the name (`fn`,
    `function`, a Java return type) then the name and `(`; a call such as `println!("{}", add(1, 2))`
    in a usage example does not match."""
    signature = [ln for ln in prompt.rstrip().splitlines() if ln.strip()][-1]
    name = _function_name(signature)
    before = signature[:signature.index(name)].split()
    return re.compile(rf"{re.escape(before[-1]) if before else ''}\s*\b{re.escape(name)}\s*\(")


def completion_from_reply(code: str, prompt: str, stop_tokens: list[str]) -> str | None:
    """The part of a reply's code that continues the prompt (None when it never defines the function)."""
    signature = [ln for ln in prompt.rstrip().splitlines() if ln.strip()][-1]
    name = _function_name(signature)
    lines = code.splitlines(keepends=True)
    for i, ln in enumerate(lines):
        if re.search(rf"\b{re.escape(name)}\s*\(", ln) and ("{" in ln or ln.strip() == signature.strip()):
            body = "".join(lines[i + 1:])
            cut = min((body.find(t) for t in stop_tokens if t in body), default=-1)
            return body if cut < 0 else body[:cut]
    return None


def with_sentinel(lang: str, tests: str, nonce: str) -> str:
    """The tests with a print of `nonce` after their last assertion: at the end of `main` (Rust, Java:
    the tests close it, and Java's class after it) or after the `test();` call (JS)."""
    if lang == "js":
        return f'{tests.rstrip()}\nconsole.log("{nonce}");\n'
    closing = 1 if lang == "rust" else 2  # braces after the last assertion: main's (and Java's class)
    cut = len(tests)
    for _ in range(closing):
        cut = tests.rfind("}", 0, cut)
    if cut < 0:
        raise MoePruneError(f"multipl_e: {lang} tests do not end by closing main: {tests[-80:]!r}")
    line = f'println!("{nonce}");' if lang == "rust" else f'System.out.println("{nonce}");'
    return f"{tests[:cut]}    {line}\n{tests[cut:]}"


@schema.schema("bench", "multipl_e")
@dataclass
class MultiplEBenchConfig(CodeBenchConfig):
    languages: Optional[List[str]] = None  # rust, java, js (null: all three)


class MultiPLE(Bench):
    default_name = "multipl_e"
    default_data = {"hf_id": "nuprl/MultiPL-E"}
    default_prompt = ("Complete the following {language} function. Reply with the complete function in a "
                      "single ```{tag} code block.\n\n```{tag}\n{prompt}\n```")
    default_max_new_tokens = 4096
    Schema = MultiplEBenchConfig
    macro_average = True  # the score is the mean of the per-language scores
    runs_code = True

    def __init__(self, cfg: MultiplEBenchConfig | None = None, **knobs):
        super().__init__(cfg, **knobs)
        self.languages = list(self.cfg.languages or DATASET_CODES)
        unknown = [lang for lang in self.languages if lang not in DATASET_CODES]
        if unknown:
            raise MoePruneError(f"bench {self.name}: languages {unknown}: expected some of {list(DATASET_CODES)}")
        self.skipped = {lang: why for lang in self.languages if (why := sandbox_isolation.missing_toolchain(lang))}
        for lang, why in self.skipped.items():
            log.warning("multipl_e: skipping %s (%s)", lang, why)
        if len(self.skipped) == len(self.languages):
            raise MoePruneError(f"bench {self.name}: no toolchain for any language: {'; '.join(self.skipped.values())}")

    def samples(self) -> list[Sample]:
        if self._samples is None:
            run = [lang for lang in self.languages if lang not in self.skipped]
            if self.data.get("path"):  # one local file holding every language (rows carry `language`)
                rows, self.data_hash = load_rows(self.data, self.data_split, self.name)
                per_lang = {lang: [r for r in rows if r["language"] == DATASET_CODES[lang]] for lang in run}
            else:
                per_lang, hashes = {}, []
                for lang in run:
                    src = {**self.data, "config": f"humaneval-{DATASET_CODES[lang]}"}
                    per_lang[lang], h = load_rows(src, self.data_split, self.name)
                    hashes.append(h)
                self.data_hash = artifacts.hash_json(hashes)
            out = []
            for lang in run:
                rows = self.select(per_lang[lang])
                if self.n is not None:
                    if len(rows) < self.n:
                        raise MoePruneError(f"bench {self.name}: {lang}: n={self.n} but the data has {len(rows)} problems")
                    rows = rows[: self.n]
                out += self.build_language(lang, rows)
            self._samples = self.in_split(out)
        return self._samples

    def build_language(self, lang: str, rows: list[dict]) -> list[Sample]:
        return [Sample(f"{lang}/{r['name']}",
                       self.render(language=DISPLAY[lang], tag=DATASET_CODES[lang], prompt=r["prompt"].rstrip()), "",
                       category=lang, extra={"prompt": r["prompt"], "tests": r["tests"],
                                             "stop_tokens": list(r["stop_tokens"])})
                for r in rows]

    def score(self, sample: Sample, completion: str) -> Verdict:
        if not completion.strip():
            return Verdict(False, "", "empty")
        lang, x = sample.category, sample.extra
        code, _ = extract_code(completion, lang, defines=definition_of(x["prompt"]))
        body = completion_from_reply(code, x["prompt"], x["stop_tokens"])
        if body is None:
            return Verdict(False, code, "the reply does not define the prompt's function")
        nonce = secrets.token_hex(16)
        res = sandbox.run_program(x["prompt"] + body + with_sentinel(lang, x["tests"], nonce), lang, limits=self.limits)
        if not res.passed:
            return Verdict(False, code, res.why())
        if nonce not in res.stdout.splitlines():
            return Verdict(False, code, "the program exited 0 before its tests ended")
        return Verdict(True, code)

    def settings(self) -> dict:
        return {**super().settings(), "skipped_languages": self.skipped}
