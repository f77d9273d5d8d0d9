"""The toy world: task generator, tokenizer and the shipped trained toy model."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from moeprune.toy import world
from moeprune.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer

MODEL_DIR = Path(world.__file__).parent / "model"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_classes_and_tags():
    assert world.CLASSES == ("generic_math", "generic_logic", "generic_code", "generic_science",
                             "generic_creative", "targeted_code_hard")
    for cls in world.CLASSES:
        for t in world.make_tasks(cls, 30, "test"):
            assert t.cls == cls and t.prompt.startswith(world.TAGS[cls])
            assert len(t.prompt) <= 50 and len(t.answer) <= 14 and t.answer and "\n" not in t.answer


@pytest.mark.parametrize("cls", world.CLASSES)
def test_make_tasks_is_deterministic(cls):
    a = world.make_tasks(cls, 50, "train", seed=3)
    assert a == world.make_tasks(cls, 50, "train", seed=3)
    assert world.make_tasks(cls, 20, "train", seed=3) == a[:20]
    assert a != world.make_tasks(cls, 50, "train", seed=4)


@pytest.mark.parametrize("cls", world.CLASSES)
def test_splits_are_disjoint(cls):
    prompts = {s: {t.prompt for t in world.make_tasks(cls, 300, s, seed=1)} for s in world.SPLITS}
    assert set(prompts) == {"train", "calib", "val", "test"}
    for a, b in itertools.combinations(world.SPLITS, 2):
        assert not prompts[a] & prompts[b], (a, b)
    for held_out in ("calib", "val", "test"):
        assert len(prompts[held_out]) == 300  # no duplicates in held-out splits
    for s, ps in prompts.items():
        assert all(world.split_of(cls, p) == s for p in ps)


@pytest.mark.parametrize("cls", ["generic_code", "targeted_code_hard"])
def test_code_answers_equal_a_real_execution(cls, tmp_path):
    import subprocess
    import sys

    tasks = world.make_tasks(cls, 40, "test")
    for t in tasks[:40]:
        src = t.prompt[len(world.TAGS[cls]):]
        out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True).stdout
        assert out.rstrip("\n") == t.answer, t


def test_other_answers():
    """Each class's answers recomputed independently from the prompt text (docs/toy-world.md)."""
    for t in world.make_tasks("generic_math", 50, "test"):
        a, b = t.prompt[4:-1].split("+")
        assert int(t.answer[::-1]) == int(a[::-1]) + int(b[::-1])
    ops = {"rev": lambda w: w[::-1], "sort": lambda w: "".join(sorted(w)), "dup": lambda w: "".join(c * 2 for c in w),
           "rot": lambda w: w[1:] + w[0], "swap": lambda w: w[-1] + w[1:-1] + w[0]}
    creative = world.make_tasks("generic_creative", 100, "test")
    assert {t.prompt[4:].split(" ")[0] for t in creative} == set(ops)
    for t in creative:
        op, word = t.prompt[4:-1].split(" ")
        assert t.answer == ops[op](word), t
    scale = {"m": -3, "": 0, "k": 3, "M": 6}
    science = world.make_tasks("generic_science", 200, "test")
    for t in science:
        (n1, p1, u1), (n2, p2, u2) = re.findall(r"(\d+)([mkM]?)([gsJW])", t.prompt)
        assert u1 == u2, t
        v1, v2 = int(n1) * 10 ** (scale[p1] + 3), int(n2) * 10 ** (scale[p2] + 3)
        assert t.answer == ("<" if v1 < v2 else ">" if v1 > v2 else "="), t
    assert {t.answer for t in science} == {"<", ">", "="}
    logic = world.make_tasks("generic_logic", 100, "test")
    for t in logic:
        expr = t.prompt[5:-1].replace("T", " True ").replace("F", " False ").replace("&", " and ")
        expr = expr.replace("|", " or ").replace("!", " not ")
        assert t.answer == ("T" if eval(expr) else "F"), t  # noqa: S307 (our own generated text)
    assert {t.answer for t in logic} == {"T", "F"}


def test_unknown_class_or_split_raises():
    with pytest.raises(ValueError, match="generic_poetry"):
        world.make_tasks("generic_poetry", 3, "test")
    with pytest.raises(ValueError, match="dev"):
        world.make_tasks("generic_math", 3, "dev")


def test_is_correct():
    t = world.Task("generic_code", "PY:a=1;print(a+1)", "2")
    assert world.is_correct(t, "2")
    assert world.is_correct(t, " 2 \nPY:junk")
    assert world.is_correct(t, "2<eos>junk")
    assert not world.is_correct(t, "22")
    assert not world.is_correct(t, "")


def test_tokenizer_special_ids_and_bos(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (
        PAD_ID, EOS_ID, BOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tok("ADD:1+2=")["input_ids"][0] == BOS_ID
    assert len(tok) <= 384
    for b in (0, 10, 255):
        assert f"<0x{b:02X}>" in tok.get_vocab()


def test_tokenizer_round_trips_every_class(tok):
    tag_ids = {tok.convert_tokens_to_ids(tag) for tag in world.TAGS.values()}
    assert len(tag_ids) == len(world.CLASSES) and tok.unk_token_id not in tag_ids
    for cls in world.CLASSES:
        for t in world.make_tasks(cls, 200, "test") + world.make_tasks(cls, 200, "train"):
            for text in (t.prompt, t.answer, t.prompt + t.answer):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert tok.decode(ids) == text
                assert UNK_ID not in ids
            p = tok(t.prompt, add_special_tokens=False)["input_ids"]
            a = tok(t.answer, add_special_tokens=False)["input_ids"]
            # merges never cross the prompt/answer boundary; the tag is the only merged token
            assert tok(t.prompt + t.answer, add_special_tokens=False)["input_ids"] == p + a
            assert p[0] in tag_ids and not (set(p[1:]) | set(a)) & tag_ids
    assert tok.decode(tok("é ü\n", add_special_tokens=False)["input_ids"]) == "é ü\n"  # byte fallback


def test_tokenizer_matches_the_shipped_one(tok):
    shipped = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    built = json.loads(tok.backend_tokenizer.to_str())
    assert shipped["model"]["vocab"] == built["model"]["vocab"]
    assert shipped["model"]["merges"] == built["model"]["merges"]
    assert shipped["model"]["byte_fallback"] is True and shipped["decoder"]["type"] == "Sequence"


@pytest.fixture(scope="module")
def shipped():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(MODEL_DIR))


def test_shipped_checkpoint_shape(shipped):
    model, tok = shipped
    cfg = model.config
    assert cfg.architectures == ["Gemma4ForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.top_k_experts) == (256, 4, 16, 2)
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tok)
    assert tok.padding_side == "left" and tok("x")["input_ids"][0] == BOS_ID
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 20 * 2**20
    report = json.loads((MODEL_DIR / "toy_report.json").read_text())
    assert min(report["evaluation"]["accuracy"].values()) >= 0.95


def test_shipped_model_solves_every_class(shipped, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    from toy_train import generation_accuracy

    model, tok = shipped
    tasks = {c: world.make_tasks(c, 100, "test", seed=7) for c in world.CLASSES}
    acc, fails = generation_accuracy(model, tok, tasks, batch_size=300)
    assert min(acc.values()) >= 0.95, (acc, fails)
