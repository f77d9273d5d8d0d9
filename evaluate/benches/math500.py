"""math500_100: MATH-500 (the first `bench.n` problems), chat mode; the reply's final answer is
compared with the gold answer by math-verify (symbolic equivalence, not string match). Broken down
by subject."""

from __future__ import annotations

from moeprune.evaluate.benches.base import Bench
from moeprune.evaluate.scoring import math_equal
from moeprune.evaluate.types import Sample, Verdict


class MATH500(Bench):
    default_name = "math500_100"
    default_data = {"hf_id": "HuggingFaceH4/MATH-500"}
    default_prompt = "Solve the following problem step by step. Put the final answer in \\boxed{{}}.\n\n{problem}"
    default_max_new_tokens = 8192

    def build(self, rows: list[dict]) -> list[Sample]:
        return [Sample(r["unique_id"], self.render(problem=r["problem"]), r["answer"], category=r.get("subject", ""))
                for r in rows]

    def score(self, sample: Sample, completion: str) -> Verdict:
        if not completion.strip():
            return Verdict(False, "", "empty")
        ok, got = math_equal(sample.reference, completion)
        return Verdict(ok, got, "" if got else "no answer parsed")

    def canonical(self, sample: Sample) -> str:
        return f"The final answer is $\\boxed{{{sample.reference}}}$."
