"""humanevalplus: HumanEval with EvalPlus's extended tests (the `evalplus/humanevalplus` dataset:
the same fields as HumanEval, its `test` a `check(candidate)` over many more inputs), scored like
humaneval. The dataset is not shipped with any package: it comes from the Hugging Face cache or a
local JSONL/parquet copy (`bench.data.path`)."""

from __future__ import annotations

from moeprune.evaluate.benches.humaneval import HumanEval


class HumanEvalPlus(HumanEval):
    default_name = "humanevalplus"
    default_data = {"hf_id": "evalplus/humanevalplus"}
