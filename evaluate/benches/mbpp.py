"""mbpp: MBPP (the `sanitized` test split by default), chat mode, pass@1: the problem's setup code
and the reply's code run in the sandbox; the problem's assert statements run apart from it
(`evaluate/calls.py`), each call of a function the reply defines answered by the program and
compared as plain data. Reads both dataset configs: `sanitized` (prompt, test_imports) and `full`
(text, test_setup_code)."""

from __future__ import annotations

from moeprune.evaluate.benches.base import Bench, CodeBenchConfig, fence
from moeprune.evaluate.calls import Tests, called_names, run_checked
from moeprune.evaluate.scoring import ANY_FUNCTION, extract_code
from moeprune.evaluate.types import Sample, Verdict


class MBPP(Bench):
    default_name = "mbpp"
    default_data = {"hf_id": "google-research-datasets/mbpp", "config": "sanitized"}
    default_prompt = (
        "You are an expert Python programmer, and here is your task: {text}\n"
        "Your code should pass these tests:\n\n{tests}\n\n"
        "Reply with the complete solution in a single ```python code block."
    )
    default_max_new_tokens = 4096
    Schema = CodeBenchConfig
    runs_code = True

    def build(self, rows: list[dict]) -> list[Sample]:
        out = []
        for r in rows:
            text = r.get("prompt") or r["text"]
            setup = "\n".join([*(r.get("test_imports") or []), r.get("test_setup_code") or ""]).strip()
            tests = list(r["test_list"])
            out.append(Sample(str(r["task_id"]), self.render(text=text, tests="\n".join(tests)), r["code"],
                              extra={"setup": setup, "tests": tests, "canonical": r["code"]}))
        return out

    def score(self, sample: Sample, completion: str) -> Verdict:
        if not completion.strip():
            return Verdict(False, "", "empty")
        code, _ = extract_code(completion, "python", defines=ANY_FUNCTION)
        setup, test = sample.extra["setup"], "\n".join(sample.extra["tests"]) + "\n"
        res = run_checked(f"{setup}\n\n{code}\n", Tests(setup, test, called_names(test, setup)), self.limits)
        return Verdict(res.passed, code, res.why)

    def canonical(self, sample: Sample) -> str:
        return fence(sample.extra["canonical"])
