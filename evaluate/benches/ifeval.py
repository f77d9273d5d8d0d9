"""ifeval_100: IFEval (the first `bench.n` prompts), chat mode, prompt-level strict accuracy: a
reply passes when every one of its prompt's verifiable instructions holds on the reply as written.

The instruction checkers are Google's IFEval checkers as packaged by `if-verifiable`. One checker,
`length_constraints:number_sentences`, needs NLTK's `punkt` sentence model, which is data, not code:
install it with `python -m nltk.downloader punkt` where there is network. Unknown instruction ids
are refused when the data is loaded (the packaged evaluator would silently skip them). IFEval has no
reference replies, so scorer validation checks only that empty answers fail.
"""

from __future__ import annotations

import json

from moeprune.errors import MoePruneError
from moeprune.evaluate.benches.base import Bench
from moeprune.evaluate.types import Sample, Verdict


class IFEval(Bench):
    default_name = "ifeval_100"
    default_data = {"hf_id": "google/IFEval"}
    default_data_split = "train"
    default_max_new_tokens = 4096

    def build(self, rows: list[dict]) -> list[Sample]:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

        out = []
        for r in rows:
            unknown = [i for i in r["instruction_id_list"] if i not in INSTRUCTION_DICT]
            if unknown:
                raise MoePruneError(f"bench {self.name}: prompt {r['key']}: unknown instruction ids {unknown}")
            kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in r["kwargs"]]
            out.append(Sample(str(r["key"]), self.render(prompt=r["prompt"]), json.dumps(r["instruction_id_list"]),
                              extra={"prompt": r["prompt"], "instructions": list(r["instruction_id_list"]),
                                     "kwargs": kwargs}))
        return out

    def score(self, sample: Sample, completion: str) -> Verdict:
        from if_verifiable.common import evaluate_instructions
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

        try:
            results, scores = evaluate_instructions(completion, sample.extra["instructions"], sample.extra["kwargs"],
                                                    sample.extra["prompt"], INSTRUCTION_DICT)
        except LookupError as e:  # NLTK data missing: a setup problem, never a model failure
            raise MoePruneError(f"bench {self.name}: an IFEval checker needs NLTK data: {str(e).strip()[:300]}") from None
        failed = [r.instruction_id for r in results if not r.strict_pass]
        passed = scores.binary_strict == 1.0
        return Verdict(passed, completion.strip()[:200], "" if passed else f"failed: {failed}" if failed else "empty")
