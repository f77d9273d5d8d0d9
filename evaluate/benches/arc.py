"""arc_challenge: ARC-Challenge (test split), chat mode, the chosen option's label extracted
flexibly and compared with `answerKey`. Labels are the dataset's own (A-E, or 1-4 on a few rows)."""

from __future__ import annotations

from moeprune.evaluate.benches.base import Bench
from moeprune.evaluate.scoring import extract_choice
from moeprune.evaluate.types import Sample, Verdict


class ARC(Bench):
    default_name = "arc_challenge"
    default_data = {"hf_id": "allenai/ai2_arc", "config": "ARC-Challenge"}
    default_prompt = ("Answer the following multiple choice question. End your reply with \"Answer: X\" where X "
                      "is the label of the correct option.\n\nQuestion: {question}\n{options}")
    default_max_new_tokens = 4096

    def build(self, rows: list[dict]) -> list[Sample]:
        out = []
        for r in rows:
            labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
            options = "\n".join(f"{lab}. {t}" for lab, t in zip(labels, texts))
            out.append(Sample(r["id"], self.render(question=r["question"], options=options), r["answerKey"],
                              extra={"labels": "".join(labels)}))
        return out

    def score(self, sample: Sample, completion: str) -> Verdict:
        got = extract_choice(completion, sample.extra["labels"])
        return Verdict(got == sample.reference, got, "" if got else "no choice found")

    def canonical(self, sample: Sample) -> str:
        return f"Answer: {sample.reference}"
