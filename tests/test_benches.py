"""Every bench preset on a local fixture in its dataset's real format: the canonical solution passes
(where the dataset has one), a right reply passes (from inside chat fences for code), a wrong reply
fails, an empty reply fails, and bad bench config fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import moeprune.cli  # noqa: F401  (registers the schema)
from moeprune.config import build
from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox_isolation
from moeprune.evaluate.bench_run import validate_bench

FIX = Path(__file__).resolve().parent / "fixtures"


def make_bench(name: str, *overrides: str):
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"bench={name}", *overrides])
    return build(cfg.bench)


def fixture_bench(name: str, fixture: str, *overrides: str):
    return make_bench(name, f"bench.data.path={FIX / fixture}", "bench.n=null", *overrides)


HE_ADD = "Sure:\n```python\ndef add(x: int, y: int):\n    return x + y\n```\nThis adds."
LCB_STDIN = "```python\nn = int(input())\nfor _ in range(n):\n    a, b = map(int, input().split())\n    print(a + b)\n```"
LCB_FUNC = "```python\nclass Solution:\n    def maxPlusK(self, nums: List[int], k: int) -> int:\n        return max(nums) + k\n```"  # the starter code as given: `List` comes from the harness prelude
VARIANT = "\nA variant:\n```python\ndef add_many(*xs):\n    return sum(xs)\n```"  # `def add` must not match it
USAGE = "\nExample usage:\n```python\nprint({call})\n```"  # chat replies often end with one: never the solution

# bench, fixture, sample index, a right reply, a wrong reply
CASES = [
    ("humanevalplus", "humanevalplus.jsonl", 1, HE_ADD, HE_ADD.replace("x + y", "x - y")),
    ("humanevalplus", "humanevalplus.jsonl", 1, HE_ADD + USAGE.format(call="add(2, 3)"),
     HE_ADD.replace("x + y", "x - y") + USAGE.format(call="add(2, 3)")),
    ("humanevalplus", "humanevalplus.jsonl", 1, HE_ADD + VARIANT, HE_ADD.replace("x + y", "x - y") + VARIANT),
    ("mbpp", "mbpp_sanitized.jsonl", 2, "```python\ndef square_perimeter(a):\n    return 4 * a\n```",
     "```python\ndef square_perimeter(a):\n    return a * a\n```"),
    ("mbpp", "mbpp_sanitized.jsonl", 2,
     "```python\ndef square_perimeter(a):\n    return 4 * a\n```" + USAGE.format(call="square_perimeter(3)"),
     "```python\ndef square_perimeter(a):\n    return a * a\n```" + USAGE.format(call="square_perimeter(3)")),
    ("lcb_medium_55", "lcb.jsonl", 1, LCB_STDIN, LCB_STDIN.replace("a + b", "a * b")),
    ("lcb_medium_55", "lcb.jsonl", 0, LCB_FUNC, LCB_FUNC.replace("max(nums)", "min(nums)")),
    ("lcb_medium_55", "lcb.jsonl", 0, LCB_FUNC + USAGE.format(call="Solution().maxPlusK([1, 2], 3)"),
     LCB_FUNC.replace("max(nums)", "min(nums)") + USAGE.format(call="Solution().maxPlusK([1, 2], 3)")),
    ("gsm8k_100", "gsm8k.jsonl", 2, "1,200 + 834 = 2,034 pencils.\n#### 2,034", "#### 2024"),
    ("math500_100", "math500.jsonl", 0, "So the point is $\\boxed{(3, \\frac{\\pi}{2})}$.", "$\\boxed{(3, \\pi)}$"),
    ("math500_100", "math500.jsonl", 1, "That is $\\boxed{0.75}$", "$\\boxed{\\frac{2}{3}}$"),
    ("aime_2024", "aime_2024.jsonl", 0, "Thus the walk takes $\\boxed{204}$ minutes.", "\\boxed{240}"),
    ("gpqa_diamond", "gpqa_diamond.jsonl", 0, None, None),  # letters depend on the shuffle: built below
    ("arc_challenge", "arc_challenge.jsonl", 0, "Faster rotation shortens days.\nAnswer: C", "Answer: A"),
    ("arc_challenge", "arc_challenge.jsonl", 1, "Answer: 4", "Answer: 2"),
    ("ifeval_100", "ifeval.jsonl", 0, "the sea is wide and blue and calm tonight",
     "The sea is wide, blue and calm tonight"),
    ("ifeval_100", "ifeval.jsonl", 1,
     "* apple\n* banana\n* cherry\nIs there anything else I can help with?", "* apple\n* banana\nBye"),
]


@pytest.mark.parametrize("name, fixture, index, right, wrong", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_scorer_on_fixture(name, fixture, index, right, wrong):
    bench = fixture_bench(name, fixture)
    sample = bench.samples()[index]
    if name == "gpqa_diamond":
        gold = sample.reference
        right, wrong = f"Reasoning...\nAnswer: ({gold})", f"Answer: ({'A' if gold != 'A' else 'B'})"
    assert bench.score(sample, right).passed, bench.score(sample, right)
    bad = bench.score(sample, wrong)
    assert not bad.passed, bad
    if name == "ifeval_100":  # the failed instruction is named
        assert any(i in bad.detail for i in sample.extra["instructions"]), bad
    else:
        assert bad.extracted != "", bad
    assert not bench.score(sample, "").passed
    assert bench.data_hash


@pytest.mark.parametrize("name, fixture", [
    ("humanevalplus", "humanevalplus.jsonl"), ("mbpp", "mbpp_sanitized.jsonl"), ("mbpp", "mbpp_full.jsonl"),
    ("gsm8k_100", "gsm8k.jsonl"), ("math500_100", "math500.jsonl"), ("aime_2024", "aime_2024.jsonl"),
    ("gpqa_diamond", "gpqa_diamond.jsonl"), ("arc_challenge", "arc_challenge.jsonl"),
])
def test_canonical_solutions_pass_and_empty_answers_fail(name, fixture, tmp_path):
    report = validate_bench(fixture_bench(name, fixture), tmp_path)
    assert report["canonical"]["score"] == 1.0 and report["canonical"]["n"] == report["n"] > 0
    assert report["empty"]["score"] == 0.0


@pytest.mark.parametrize("name, fixture", [("lcb_medium_55", "lcb.jsonl"), ("ifeval_100", "ifeval.jsonl")])
def test_benches_without_reference_solutions_validate_empty_only(name, fixture, tmp_path):
    report = validate_bench(fixture_bench(name, fixture), tmp_path)
    assert report["canonical"]["n"] == 0 and report["canonical"]["score"] is None
    assert report["empty"]["score"] == 0.0


def test_code_is_taken_from_the_fence_not_the_prose():
    bench = fixture_bench("humanevalplus", "humanevalplus.jsonl")
    sample = bench.samples()[1]
    prose_then_fence = "Here is `add`, it returns the sum.\n\n```python\ndef add(x, y):\n    return x + y\n```\nDone!"
    assert bench.score(sample, prose_then_fence).passed
    unfenced_with_prose = "Here is add:\ndef add(x, y):\n    return x + y"
    assert not bench.score(sample, unfenced_with_prose).passed  # prose is not Python
    truncated_fence = "```python\ndef add(x, y):\n    return x + y\n"
    assert bench.score(sample, truncated_fence).passed  # an unclosed fence counts up to the end


def test_evalplus_extended_tests_catch_what_base_tests_miss():
    bench = fixture_bench("humanevalplus", "humanevalplus.jsonl")
    # Passes HumanEval's base tests for has_close_elements but fails EvalPlus's empty-list input.
    sloppy = ("```python\ndef has_close_elements(numbers, threshold):\n"
              "    s = sorted(numbers)\n    return min(b - a for a, b in zip(s, s[1:])) < threshold\n```")
    assert not bench.score(bench.samples()[0], sloppy).passed


def test_lcb_selection_by_filter_order_and_task_ids():
    bench = fixture_bench("lcb_medium_55", "lcb.jsonl")
    assert [s.id for s in bench.samples()] == ["3100", "abc900_b"]  # medium only, by contest date
    pinned = fixture_bench("lcb_medium_55", "lcb.jsonl", "bench.task_ids=[abc901_a,abc900_b]", "bench.filter={}")
    assert [s.id for s in pinned.samples()] == ["abc901_a", "abc900_b"]
    with pytest.raises(MoePruneError, match="task ids not in the data: \\['nope'\\]"):
        fixture_bench("lcb_medium_55", "lcb.jsonl", "bench.task_ids=[nope]").samples()
    assert len(bench.samples()[1].extra["tests"]) == 3  # public + decoded private tests


MULTIPL_E_REPLIES = {
    "rust": ("```rust\nfn add(x: isize, y: isize) -> isize {\n    x + y\n}\n```", "x + y", "x * y"),
    "java": ("```java\nclass Problem {\n    public static long add(long x, long y) {\n        return x + y;\n    }\n}\n```",
             "x + y", "x - y"),
    "js": ("```javascript\nfunction add(x, y){\n  return x + y;\n}\n```", "x + y", "x - y"),
}
MULTIPL_E_USAGE = {  # a trailing example that calls the function: never the block to score
    "rust": "\nUsage:\n```rust\nfn main() {\n    println!(\"{}\", add(1, 2));\n}\n```",
    "java": ("\nUsage:\n```java\nclass Main { public static void main(String[] a) "
             "{ System.out.println(Problem.add(1, 2)); } }\n```"),
    "js": "\nUsage:\n```javascript\nconsole.log(add(1, 2));\n```",
}


def test_multipl_e_without_a_toolchain_for_any_language_says_so_before_generating(monkeypatch):
    monkeypatch.setattr(sandbox_isolation, "missing_toolchain", lambda lang: f"{lang}: compiler not found")
    with pytest.raises(MoePruneError, match="bench multipl_e: no toolchain for any language: rust: compiler not found"):
        fixture_bench("multipl_e", "multipl_e.jsonl", "bench.languages=[rust]")


@pytest.mark.parametrize("lang", ["rust", "java", "js"])
def test_multipl_e_compiles_and_runs_each_language(lang):
    if sandbox_isolation.missing_toolchain(lang):
        pytest.skip(sandbox_isolation.missing_toolchain(lang))
    bench = fixture_bench("multipl_e", "multipl_e.jsonl", f"bench.languages=[{lang}]")
    (sample,) = bench.samples()
    reply, good, bad = MULTIPL_E_REPLIES[lang]
    assert bench.score(sample, reply).passed, bench.score(sample, reply)
    assert not bench.score(sample, reply.replace(good, bad)).passed
    with_usage = reply + MULTIPL_E_USAGE[lang]
    assert bench.score(sample, with_usage).passed, bench.score(sample, with_usage)
    assert not bench.score(sample, with_usage.replace(good, bad)).passed
    assert not bench.score(sample, "").passed
    assert "does not define" in bench.score(sample, "```\nprint(1)\n```").detail


def test_gpqa_shuffle_is_seeded_and_breaks_down_by_domain():
    a = fixture_bench("gpqa_diamond", "gpqa_diamond.jsonl").samples()
    b = fixture_bench("gpqa_diamond", "gpqa_diamond.jsonl").samples()
    c = fixture_bench("gpqa_diamond", "gpqa_diamond.jsonl", "bench.seed=7").samples()
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert [s.category for s in a] == ["Physics", "Chemistry", "Biology"]
    assert a[0].extra["subdomain"] == "High-energy particle physics"


@pytest.mark.parametrize("overrides, message", [
    (["bench.data.path=/no/such.jsonl"], "does not exist"),
    (["bench.n=5"], "n=5 but the data has only 3 problems"),
    (["+bench.filter.no_field=1"], "the data has no field 'no_field'"),
    (["bench.prompt='Q: {nope}'"], "prompt template uses 'nope'"),
])
def test_bad_bench_config_fails_clearly(overrides, message):
    with pytest.raises(MoePruneError, match=message):
        make_bench("gsm8k_100", f"bench.data.path={FIX / 'gsm8k.jsonl'}", "bench.n=null", *overrides).samples()


def test_unreachable_dataset_names_the_dataset_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoePruneError, match="'openai/gsm8k'.*bench.data.path"):
        make_bench("gsm8k_100").samples()


def test_a_prompt_with_a_lone_brace_is_refused_with_the_escaping_rule():
    bench = fixture_bench("humaneval", "humanevalplus.jsonl", "bench.prompt='{prompt} end with }'")
    with pytest.raises(MoePruneError, match=r"not a format string .* doubled as \{\{ and \}\}"):
        bench.samples()


def test_token_stats_count_an_answer_read_from_reasoning_once():
    from moeprune.evaluate.stats import token_stats

    rows = [{"reasoning": "r" * 1000, "completion": "r" * 1000, "answer_source": "reasoning_content", "tokens": 5},
            {"reasoning": "r" * 10, "completion": "a" * 20, "answer_source": "content", "tokens": 5}]
    assert token_stats(rows)["chars"]["max"] == 1000 and token_stats(rows[1:])["chars"]["max"] == 30


def test_toy_suite_keeps_an_explicit_max_new_tokens():
    from moeprune.evaluate.benches.toy_suite import ToySuite
    from moeprune.toy import world

    assert ToySuite().max_new_tokens == world.MAX_NEW_TOKENS
    assert ToySuite(max_new_tokens=2048).max_new_tokens == 2048


def test_toy_suite_with_split_val_scores_val_tasks_only():
    from moeprune.evaluate.benches.toy_suite import ToySuite
    from moeprune.toy import world

    rows = ToySuite(n_per_class=5, split="val").rows()
    assert len(rows) == 5 * len(world.CLASSES)
    assert {world.split_of(r["cls"], r["prompt"]) for r in rows} == {"val"}
    assert ToySuite(n_per_class=5).split == "test"  # the default stays the reported split
