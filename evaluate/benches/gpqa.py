"""gpqa_diamond: the 198 GPQA Diamond questions, chat mode, four options shuffled per question
with a fixed seed, flexible extraction of the chosen letter. Broken down by the dataset's
high-level domain (Physics / Chemistry / Biology); the subdomain is kept in each sample record."""

from __future__ import annotations

import random
from dataclasses import dataclass

from moeprune import schema
from moeprune.evaluate.benches.base import Bench, BenchConfig
from moeprune.evaluate.scoring import extract_choice
from moeprune.evaluate.types import Sample, Verdict

LETTERS = "ABCD"


@schema.schema("bench", "shuffled")
@dataclass
class ShuffledBenchConfig(BenchConfig):
    """gpqa_diamond: answer options shuffled per question."""

    seed: int = 0  # the option order


class GPQA(Bench):
    Schema = ShuffledBenchConfig
    default_name = "gpqa_diamond"
    default_data = {"hf_id": "Idavidrein/gpqa", "config": "gpqa_diamond"}
    default_data_split = "train"
    default_prompt = ("Answer the following multiple choice question. Think step by step, then end your reply "
                      "with \"Answer: (X)\" where X is one of A, B, C, D.\n\n{question}\n\n{options}")
    default_max_new_tokens = 16384

    def build(self, rows: list[dict]) -> list[Sample]:
        out = []
        for r in rows:
            rid = r.get("Record ID") or r["Question"][:64]
            choices = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
            order = list(range(4))
            random.Random(f"{self.seed}:{rid}").shuffle(order)  # per question: stable under subsetting
            gold = LETTERS[order.index(0)]
            options = "\n".join(f"({LETTERS[i]}) {choices[j].strip()}" for i, j in enumerate(order))
            out.append(Sample(str(rid), self.render(question=r["Question"].strip(), options=options), gold,
                              category=r.get("High-level domain", ""), extra={"subdomain": r.get("Subdomain", "")}))
        return out

    def score(self, sample: Sample, completion: str) -> Verdict:
        got = extract_choice(completion, LETTERS)
        return Verdict(got == sample.reference, got, "" if got else "no choice found")

    def canonical(self, sample: Sample) -> str:
        return f"Answer: ({sample.reference})"
