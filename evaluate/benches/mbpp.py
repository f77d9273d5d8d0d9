"""mbpp: MBPP (the `sanitized` test split by default), chat mode, pass@1: the reply's code, then the
problem's setup code and its assert statements, run in the sandbox. Reads both dataset configs:
`sanitized` (prompt, test_imports) and `full` (text, test_setup_code)."""

from __future__ import annotations

from moeprune.evaluate import sandbox
from moeprune.evaluate.benches.base import Bench, fence
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
        program = "\n\n".join([sample.extra["setup"], code, *sample.extra["tests"]]) + "\n"
        res = sandbox.run_program(program, "python", limits=self.limits)
        return Verdict(res.passed, code, "" if res.passed else res.why())

    def canonical(self, sample: Sample) -> str:
        return fence(sample.extra["canonical"])
