"""lcb_medium_55 / lcb_medium_100: LiveCodeBench code generation (the `code_generation_lite` rows),
pass@1: the reply's program must pass every public and private test.

Selection: `bench.task_ids` (question ids, in that order) when given, else the rows matching
`bench.filter` (e.g. difficulty: medium) ordered by (contest_date, question_id), first `bench.n`.
Tests are of two kinds, as in LiveCodeBench's own harness: `stdin` (run the program on the input;
the scorer compares its stdout line by line, numbers with a 1e-6 tolerance) and `functional` (call
`Solution().<func_name>(*args)` with one JSON value per input line and compare the JSON result: the
call is made from a sandbox apart from the program, which answers it as plain data;
`evaluate/calls.py`).
The dataset has no reference solutions, so scorer validation checks only that empty answers fail.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import zlib
from dataclasses import dataclass
from typing import List, Optional

from moeprune import schema
from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox
from moeprune.evaluate.benches.base import Bench, CodeBenchConfig
from moeprune.evaluate.calls import Tests, run_checked
from moeprune.evaluate.scoring import extract_code
from moeprune.evaluate.types import Sample, Verdict

_STARTER = ("You will use the following starter code to write the solution to the problem and enclose "
            "your code within delimiters.\n```python\n{starter_code}\n```")
_STDIN = ("Read the inputs from stdin, solve the problem and write the answer to stdout (do not directly "
          "test on the sample inputs). Enclose your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```")
# LiveCodeBench's harness runs every program after star-imports of the standard library modules
# solutions lean on (typing's List/Optional in the starter code, collections, heapq, math...) and a
# raised recursion limit; without them a reply that restates the starter code fails on `List`.
_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random", "statistics",
            "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing")
_PRELUDE = ("".join(f"from {m} import *\n" for m in _MODULES) + "".join(f"import {m}\n" for m in _MODULES)
            + "sys.setrecursionlimit(50000)\n")
_SOLUTION = re.compile(r"^class\s+Solution\b", re.M)  # the functional problems' entry class
_FUNCTIONAL_TEST = """\
_got = Solution().{func}(*[_json.loads(_l) for _l in _INPUT.splitlines() if _l.strip()])
assert _json.loads(_json.dumps(_got)) == _json.loads(_EXPECTED), "wrong output"
"""


def decode_tests(field: str) -> list[dict]:
    """LiveCodeBench stores public tests as JSON and private tests as base64(zlib(pickle(JSON)))."""
    if not field:
        return []
    try:
        return json.loads(field)
    except json.JSONDecodeError:
        # The dataset's own encoding; unpickling executes nothing beyond building a str here, but it
        # trusts the dataset file as LiveCodeBench's harness does.
        return json.loads(pickle.loads(zlib.decompress(base64.b64decode(field.encode()))))


def outputs_match(got: str, expected: str) -> bool:
    g = [ln.strip() for ln in got.strip().splitlines()]
    e = [ln.strip() for ln in expected.strip().splitlines()]
    if g == e:
        return True
    gt, et = " ".join(g).split(), " ".join(e).split()
    if len(gt) != len(et):
        return False
    for a, b in zip(gt, et):
        if a != b:
            try:
                if abs(float(a) - float(b)) > 1e-6:
                    return False
            except ValueError:
                return False
    return True


@schema.schema("bench", "lcb")
@dataclass
class LcbBenchConfig(CodeBenchConfig):
    task_ids: Optional[List[str]] = None  # these problems, in this order


class LiveCodeBench(Bench):
    default_name = "lcb_medium_55"
    # release_v4 of code_generation_lite is the union of its first four files.
    default_data = {"hf_id": "livecodebench/code_generation_lite",
                    "data_files": ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl"]}
    default_data_split = "train"
    default_prompt = ("You will be given a question (problem specification) and will generate a correct Python "
                      "program that matches the specification and passes all tests.\n\nQuestion: {question}\n\n{format}")
    default_max_new_tokens = 16384
    Schema = LcbBenchConfig
    runs_code = True

    def __init__(self, cfg: LcbBenchConfig | None = None, **knobs):
        super().__init__(cfg, **knobs)
        self.task_ids = self.cfg.task_ids

    def select(self, rows: list[dict]) -> list[dict]:
        if self.task_ids is None:
            rows = super().select(rows)
            return sorted(rows, key=lambda r: (str(r.get("contest_date", "")), str(r["question_id"])))
        by_id = {str(r["question_id"]): r for r in rows}
        missing = [t for t in self.task_ids if str(t) not in by_id]
        if missing:
            raise MoePruneError(f"bench {self.name}: task ids not in the data: {missing[:10]}")
        return [by_id[str(t)] for t in self.task_ids]

    def build(self, rows: list[dict]) -> list[Sample]:
        out = []
        for r in rows:
            starter = r.get("starter_code") or ""
            fmt = _STARTER.format(starter_code=starter) if starter.strip() else _STDIN
            tests = decode_tests(r["public_test_cases"]) + decode_tests(r.get("private_test_cases") or "")
            meta = json.loads(r.get("metadata") or "{}")
            if not tests:
                raise MoePruneError(f"bench {self.name}: problem {r['question_id']} has no tests")
            out.append(Sample(str(r["question_id"]), self.render(question=r["question_content"], format=fmt), "",
                              category=str(r.get("difficulty", "")),
                              extra={"tests": tests, "func_name": meta.get("func_name")}))
        return out

    def score(self, sample: Sample, completion: str) -> Verdict:
        if not completion.strip():
            return Verdict(False, "", "empty")
        code, _ = extract_code(completion, "python", defines=_SOLUTION if sample.extra["func_name"] else None)
        program = _PRELUDE + code + "\n"
        for i, test in enumerate(sample.extra["tests"]):
            if test.get("testtype") == "functional":
                checked = run_checked(program, Tests("import json as _json\n",
                                                     _FUNCTIONAL_TEST.format(func=sample.extra["func_name"]),
                                                     ("Solution",), {"_INPUT": test["input"], "_EXPECTED": test["output"]}),
                                      self.limits)
                if not checked.passed:
                    return Verdict(False, code, f"test {i}: {checked.why}")
                continue
            res = sandbox.run_program(program, "python", stdin=test["input"], limits=self.limits)
            if not res.passed:
                return Verdict(False, code, f"test {i}: {res.why()}")
            if not outputs_match(res.stdout, test["output"]):
                return Verdict(False, code, f"test {i}: wrong output")
        return Verdict(True, code)
