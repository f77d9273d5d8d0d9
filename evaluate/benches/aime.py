"""aime_2024: the 30 AIME 2024 problems, chat mode, exact match of the integer answer (0-999),
read from the last `\\boxed{}` or else the last number of the reply."""

from __future__ import annotations

from moeprune.evaluate.benches.base import Bench
from moeprune.evaluate.scoring import extract_number, numbers_equal
from moeprune.evaluate.types import Sample, Verdict


class AIME(Bench):
    default_name = "aime_2024"
    default_data = {"hf_id": "HuggingFaceH4/aime_2024"}
    default_data_split = "train"
    default_prompt = ("Solve the following problem step by step. The answer is an integer from 0 to 999; put it "
                      "in \\boxed{{}}.\n\n{problem}")
    default_max_new_tokens = 16384

    def build(self, rows: list[dict]) -> list[Sample]:
        return [Sample(str(r["id"]), self.render(problem=r["problem"]), str(r["answer"]).strip()) for r in rows]

    def score(self, sample: Sample, completion: str) -> Verdict:
        got = extract_number(completion)
        return Verdict(numbers_equal(got, sample.reference), got, "" if got else "no number found")

    def canonical(self, sample: Sample) -> str:
        return f"\\boxed{{{sample.reference}}}"
