"""gsm8k_100: GSM8K test problems (the first `bench.n`), chat mode, zero-shot chain of thought,
flexible extraction: an explicit final answer (`#### N`, `\\boxed{N}`, `the answer is N`) or else
the last number in the reply, compared numerically with the gold answer after `####`."""

from __future__ import annotations

from moeprune.evaluate.benches.base import Bench
from moeprune.evaluate.scoring import extract_number, numbers_equal
from moeprune.evaluate.types import Sample, Verdict


class GSM8K(Bench):
    default_name = "gsm8k_100"
    default_data = {"hf_id": "openai/gsm8k", "config": "main"}
    default_prompt = ("Solve the following math problem step by step. End your reply with the final answer on "
                      "its own line in the form \"#### <number>\".\n\nQuestion: {question}")
    default_max_new_tokens = 4096

    def build(self, rows: list[dict]) -> list[Sample]:
        return [Sample(f"gsm8k/{i}", self.render(question=r["question"]), r["answer"].split("####")[-1].strip(),
                       extra={"solution": r["answer"], "question": r["question"]})
                for i, r in enumerate(rows)]

    def split_key(self, sample: Sample) -> str:
        return sample.extra["question"]  # the id is the row's index: the question is what stays put

    def score(self, sample: Sample, completion: str) -> Verdict:
        got = extract_number(completion)
        return Verdict(numbers_equal(got, sample.reference), got, "" if got else "no number found")

    def canonical(self, sample: Sample) -> str:
        return sample.extra["solution"]
