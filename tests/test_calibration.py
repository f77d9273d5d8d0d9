"""Calibration corpora: sources, tiers, chat template, continuation, and every bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from moeprune.config import CalibrationConfig
from moeprune.errors import MoePruneError
from moeprune.prune.calibration import build_corpus, calibration_files, continue_greedy
from moeprune.toy import world
from moeprune.toy.tokenizer import build_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "calibration"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(CalibrationConfig), {"name": "t", **kw})


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_toy_preset_covers_every_toy_class(tok):
    c = OmegaConf.merge(OmegaConf.structured(CalibrationConfig), OmegaConf.load(CONF / "toy.yaml"))
    corpus = build_corpus(c, tok, max_context=128)
    assert list(corpus) == list(world.CLASSES)
    tasks = world.make_tasks("generic_code", 64, "calib", 0)
    assert [p.ids for p in corpus["generic_code"]] == [tuple(tok(t.prompt + t.answer)["input_ids"]) for t in tasks]
    assert {p.tier for ps in corpus.values() for p in ps} == {"short"}


def test_files_tiers_limits_and_weights(tok, tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": f"a={i}"} for i in range(5)])
    long = tmp_path / "long.txt"
    long.write_text("x" * 50 + "\n\n" + "y" * 10 + "\n")
    c = cfg(classes={"code": [{"path": str(short), "limit": 3},
                              {"kind": "text", "path": str(long), "tier": "long"}]},
            tiers={"long": {"max_tokens": 20, "weight": 3.0, "overflow": "window"}}, samples_per_class=None)
    passes = build_corpus(c, tok)["code"]
    assert [p.tier for p in passes] == ["short"] * 3 + ["long"] * 4  # 51 tokens -> 20+20+11, then 11
    assert [len(p.ids) for p in passes[3:]] == [20, 20, 11, 11] and passes[3].weight == 3.0
    assert passes[0].ids == tuple(tok("a=0")["input_ids"])
    assert set(calibration_files(c)) == {"calibration.code[0]", "calibration.code[1]"}
    # samples_per_class caps prompts (not windows) across a class's sources, in order
    capped = build_corpus(cfg(classes=c.classes, tiers=c.tiers, samples_per_class=4), tok)["code"]
    assert [len(p.ids) for p in capped] == [4, 4, 4, 20, 20, 11]


def test_over_long_prompt_truncates_with_warning_or_is_refused(tok, tmp_path, caplog):
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": "z" * 40}, {"text": "ok"}])
    trunc = cfg(classes={"c": [{"path": str(f)}]}, tiers={"short": {"max_tokens": 16}})
    with caplog.at_level(logging.WARNING, logger="moeprune"):
        passes = build_corpus(trunc, tok)["c"]
    assert [len(p.ids) for p in passes] == [16, 3] and "1 prompts truncated" in caplog.text
    refuse = cfg(classes={"c": [{"path": str(f)}]}, tiers={"short": {"max_tokens": 16, "overflow": "error"}})
    with pytest.raises(MoePruneError, match=r"class 'c' source 0 prompt 0: prompt of 41 tokens exceeds .*=16"):
        build_corpus(refuse, tok)
    with pytest.raises(MoePruneError, match=r"max_tokens=16 \+ generate_tokens=8 exceeds the model's context \(20"):
        build_corpus(cfg(classes={"c": [{"path": str(f)}]}, tiers={"short": {"max_tokens": 16}}, generate_tokens=8),
                     tok, max_context=20)


def test_bad_corpora_fail_clearly(tok, tmp_path):
    notjson = tmp_path / "plain.jsonl"
    notjson.write_text('{"text": "fine"}\nthis is plain text\n')
    with pytest.raises(MoePruneError, match=r"plain.jsonl:2 is not JSON .*expected one JSON object per line"):
        build_corpus(cfg(classes={"c": [{"path": str(notjson)}]}), tok)
    nokey = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "x"}])
    with pytest.raises(MoePruneError, match=r"k.jsonl:1: expected a JSON object with key 'text', got \['prompt'\]"):
        build_corpus(cfg(classes={"c": [{"path": str(nokey)}]}), tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MoePruneError, match="class 'c' is empty"):
        build_corpus(cfg(classes={"c": [{"path": str(empty)}]}), tok)
    with pytest.raises(MoePruneError, match="class 'c' is empty: expected at least one source"):
        build_corpus(cfg(classes={"c": []}), tok)
    with pytest.raises(MoePruneError, match="calibration file not found"):
        build_corpus(cfg(classes={"c": [{"path": str(tmp_path / "missing.jsonl")}]}), tok)
    with pytest.raises(MoePruneError, match=r"tier='huge': expected one of calibration.tiers: \['short'\]"):
        build_corpus(cfg(classes={"c": [{"kind": "toy", "tier": "huge"}]}), tok)
    with pytest.raises(MoePruneError, match=r"classes.c\[0\]: ConfigKeyError.*bogus"):
        build_corpus(cfg(classes={"c": [{"kind": "toy", "bogus": 1}]}), tok)
    with pytest.raises(MoePruneError, match="unknown toy class 'nope'"):
        build_corpus(cfg(classes={"nope": [{"kind": "toy"}]}), tok)
    with pytest.raises(MoePruneError, match="no classes"):
        build_corpus(cfg(), tok)


def test_chat_template_wraps_prompts_and_messages(tok, tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"text": "hi"}, {"text": [{"role": "user", "content": "yo"}]}])
    c = cfg(classes={"c": [{"path": str(f)}]}, chat_template=True)
    with pytest.raises(MoePruneError, match="tokenizer has no chat template"):
        build_corpus(c, tok)
    with pytest.raises(MoePruneError, match="chat message list: set calibration.chat_template=true"):
        build_corpus(cfg(classes={"c": [{"path": str(f)}]}), tok)
    templated = build_tokenizer()
    templated.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}<model>{% endif %}"
    passes = build_corpus(c, templated)["c"]
    assert templated.decode(passes[0].ids) == "<user>hi\n<model>"
    assert templated.decode(passes[1].ids) == "<user>yo\n<model>"


def test_datasets_source_reads_a_local_dataset(tok, tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "ds"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"question": f"q{i}"} for i in range(6)])
    c = cfg(classes={"c": [{"kind": "datasets", "path": str(data), "field": "question", "limit": 4}]})
    passes = build_corpus(c, tok)["c"]
    assert [tok.decode(p.ids, skip_special_tokens=True) for p in passes] == ["q0", "q1", "q2", "q3"]
    bad = cfg(classes={"c": [{"kind": "datasets", "path": str(data), "field": "answer"}]})
    with pytest.raises(MoePruneError, match=r"no column 'answer'; columns: \['question'\]"):
        build_corpus(bad, tok)
    with pytest.raises(MoePruneError, match="could not be loaded"):
        build_corpus(cfg(classes={"c": [{"kind": "datasets", "path": str(tmp_path / "none")}]}), tok)


def test_greedy_continuation_matches_generate_alone(tok, tiny_gemma4):
    from moeprune.models import load_model

    model = load_model(tiny_gemma4)
    corpus = build_corpus(cfg(classes={"c": [{"kind": "toy", "path": "generic_math", "field": "prompt"}]},
                              samples_per_class=3), tok)
    longer = continue_greedy(model, corpus, 5, batch_size=2, tokenizer=tok)["c"]
    for before, after in zip(corpus["c"], longer):
        assert after.ids[:len(before.ids)] == before.ids and 0 < len(after.ids) - len(before.ids) <= 5
    assert len({len(p.ids) for p in corpus["c"]}) > 1, "prompts of different lengths: some rows are padded"
    for prompt, got in zip(corpus["c"], longer):  # every row, padded or not, continues as it would alone
        alone = model.generate(torch.tensor([prompt.ids]), max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0].tolist()
        cut = alone[len(prompt.ids):]
        if tok.eos_token_id in cut:
            cut = cut[:cut.index(tok.eos_token_id) + 1]
        assert list(got.ids) == alone[:len(prompt.ids)] + cut


def test_completion_scoring_counts_only_answer_producing_positions(tok, tiny_gemma4):
    from moeprune.adapters import adapter_for
    from moeprune.models import load_model, read_config
    from moeprune.prune.profile import profile_model

    classes = {"c": [{"kind": "toy", "path": "generic_code"}]}
    full = build_corpus(cfg(classes=classes, samples_per_class=4), tok)["c"]
    scored = build_corpus(cfg(classes=classes, samples_per_class=4, score_tokens="completion"), tok)["c"]
    tasks = world.make_tasks("generic_code", 4, "calib", 0)
    for a, b, t in zip(full, scored, tasks):
        assert a.ids == b.ids and a.start == 0  # the same forward pass, fewer counted positions
        assert b.start == len(tok(t.prompt)["input_ids"]) - 1
        assert tok.decode(b.ids[b.start + 1:], skip_special_tokens=True) == t.answer
    model = load_model(tiny_gemma4)
    adapter = adapter_for(read_config(tiny_gemma4))
    counts = profile_model(model, adapter, {"c": scored}).stats["count"]
    top_k = 2
    assert counts.sum(dim=-1)[0].tolist() == [sum(len(p.ids) - p.start for p in scored) * top_k] * counts.shape[1]


def test_completion_scoring_needs_a_known_answer_start(tok, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    with pytest.raises(MoePruneError, match="score_tokens=completion needs to know where the answer starts"):
        build_corpus(cfg(classes={"c": [{"path": str(f)}]}, score_tokens="completion"), tok)
    with pytest.raises(ValidationError, match=r"Invalid value 'sometimes', expected one of \[all, completion\]"):
        cfg(classes={"c": [{"path": str(f)}]}, score_tokens="sometimes")  # the schema refuses it
