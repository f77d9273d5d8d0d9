"""The GGUF ladder with the real llama.cpp tools (built from the llama-cpp-python sdist on first use).

On a tiny Gemma 4 MoE that llama.cpp handles like a real one: F16, Q8_0, Q4_K_M and IQ4_XS (imatrix)
through quant.gguf_tier, a CD tier through the whole CLI pipeline (quant + evaluate_quant through
llama-server), every file loaded and run through llama-server, and the failure paths.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from moeprune.errors import MoePruneError

pytestmark = pytest.mark.llamacpp
TIERS = ("f16", "q8_0", "q4_k_m", "iq4_xs")


@pytest.fixture(scope="module")
def toolchain():
    from moeprune.quant import toolchain

    return toolchain.ensure()  # builds on first use (minutes), cached outside the repo


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from quant_support import save_gguf_ready_gemma4

    return save_gguf_ready_gemma4(tmp_path_factory.mktemp("gguf") / "tiny")


@pytest.fixture(scope="module")
def ladder(toolchain, model, tmp_path_factory):
    from quant_support import toy_corpus

    from moeprune.presets import quant_tier
    from moeprune.quant import gguf_tier

    root = tmp_path_factory.mktemp("ladder")
    out = {}
    for name in TIERS:
        (root / name).mkdir()
        m = gguf_tier.produce(quant_tier(name), model, root / name, root / "base", corpus=toy_corpus(16),
                              model_name="tiny")
        out[name] = (root / name, m)
    return out


def hf_parameters(model_dir: Path) -> int:
    """Every element of the checkpoint, counted from the loaded tensors (the manifest reads headers)."""
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())


def test_ladder_manifests(ladder, model):
    from moeprune import artifacts

    params = hf_parameters(model)
    sizes = {}
    for name, (out, m) in ladder.items():
        gguf = out / m["file"]
        assert json.loads((out / "quant-manifest.json").read_text()) == json.loads(json.dumps(m))
        assert m["size_bytes"] == gguf.stat().st_size and m["parameters"] == params
        assert m["bits_per_weight"] == round(8 * gguf.stat().st_size / params, 4)
        assert m["sha256"] == artifacts.hash_file(gguf, True)
        sizes[name] = m["size_bytes"]
        for tensor, fb in m["fallbacks"].items():  # recorded fallbacks are what the file holds
            assert m["tensor_types"][tensor].lower() == fb["got"].lower()
        if m["tier"]["imatrix"]:
            im = out / m["imatrix"]["file"]
            assert m["imatrix"]["sha256"] == artifacts.hash_file(im, True)
            assert (out / m["imatrix"]["text"]).read_text().count("\n") == m["imatrix"]["text_lines"] == 6 * 16
        else:
            assert m["imatrix"] is None and not (out / "imatrix.gguf").exists()
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"] > sizes["iq4_xs"]
    # one imatrix, shared by the ladder (computed once from the F16 base)
    assert ladder["q4_k_m"][1]["imatrix"]["sha256"] == ladder["iq4_xs"][1]["imatrix"]["sha256"]
    types = {name: set(m["tensor_types"].values()) for name, (_, m) in ladder.items()}
    assert types["f16"] == {"F16", "F32"} and types["q8_0"] == {"Q8_0", "F32"}
    assert "IQ4_XS" in types["iq4_xs"] and "Q4_K" in types["q4_k_m"]
    # rows of 128 (the sliding layers' attn_output) cannot hold 256-blocks: llama.cpp's documented fallback
    fb = ladder["q4_k_m"][1]["fallbacks"]["blk.0.attn_output.weight"]
    assert (fb["ncols"], fb["block"]) == (128, 256) and fb["got"] in ("q5_0", "q5_1", "q8_0")
    assert ladder["q8_0"][1]["fallbacks"] == {}  # 32-blocks fit every row here


def server_post(url: str, path: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_f16_gguf_computes_what_the_hf_model_computes(ladder, model):
    """llama-server on the F16 file tokenizes as the HF tokenizer does and continues greedily as the
    HF model does (this llama-server returns no log-probabilities to compare more finely)."""
    import torch

    from moeprune.evaluate.backends.llama_cpp import LlamaCppBackend
    from moeprune.models import load_model, load_tokenizer

    out, m = ladder["f16"]
    tok, hf = load_tokenizer(model), load_model(model, "float32", "cpu")
    backend = LlamaCppBackend(out / m["file"], concurrency=1, server_args=["-c", "64"])
    try:
        backend.generate(["ADD:1+1="], 1)  # starts the server
        for text in ("ADD:482+39=", "BOOL:!(T&F)|(F&T)=", "TXT:rev planet="):
            ids = server_post(backend.url, "/tokenize", {"content": text, "add_special": True})["tokens"]
            assert ids == tok(text)["input_ids"]
            got = server_post(backend.url, "/completion", {"prompt": ids, "n_predict": 3, "temperature": 0,
                                                           "return_tokens": True, "cache_prompt": False})["tokens"]
            with torch.no_grad():  # HF greedy, one token at a time, on the same ids
                want = list(ids)
                for _ in range(3):
                    want.append(int(hf(torch.tensor([want])).logits[0, -1].argmax()))
            assert got == want[len(ids):], text
    finally:
        backend.close()


def test_every_tier_loads_and_generates_through_llama_server(ladder):
    from moeprune.evaluate.backends.llama_cpp import LlamaCppBackend
    from moeprune.toy import world

    prompts = [t.prompt for t in world.make_tasks("generic_math", 4, "test", 0)]
    for name, (out, m) in ladder.items():
        backend = LlamaCppBackend(out / m["file"], concurrency=2, server_args=["-c", "256"])
        try:
            comps = backend.generate(prompts, 8)
        finally:
            backend.close()
        assert len(comps) == 4 and all(c.text and 0 < c.tokens <= 8 for c in comps), (name, comps)  # every prompt answered


def test_cd_tier_through_the_pipeline(toolchain, model, tmp_path):
    from test_pipeline import cached, moeprune, stage_dirs
    from test_quant_cd import documented_rule, parse_type_file

    from moeprune import artifacts
    from moeprune.profile import Profile
    from moeprune.presets import quant_tier

    args = [f"model.path={model}", "quant_tier=cd_q4_k_m", "calibration.samples_per_class=8", "bench.n_per_class=2",
            "stages.evaluate_base=false", "keep.experts_per_layer=6"]
    proc = moeprune(args, tmp_path / "cache", tmp_path / "run1")
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("class"))
    assert header.split() == ["class", "base", "pruned", "Q4_K_M", "delta"]  # the quantized file's column
    log = proc.stdout + proc.stderr + (tmp_path / "run1" / "moeprune.log").read_text()
    assert "evaluate_quant built" in log and "HTTP Request" not in log  # llama-server calls stay out of the log
    dirs = stage_dirs(tmp_path / "run1")
    quant, m = dirs["quant"], artifacts.read_json(dirs["quant"] / "quant-manifest.json")
    meta = artifacts.read_json(quant / "expert_drop_metadata.json")
    keep = {int(k): v for k, v in meta["keep"].items()}
    expected = documented_rule(Profile.load(dirs["profile"]), keep, quant_tier("cd_q4_k_m").cd)
    written = parse_type_file((quant / "tensor-types.txt").read_text())
    assert {layer: set(fam.values()) for layer, fam in written.items()} == {l: {t} for l, t in expected.items()}
    for layer, typ in expected.items():  # the GGUF holds those types (or llama.cpp's recorded fallback)
        for family in ("gate_up", "down"):
            name = f"blk.{layer}.ffn_{family}_exps.weight"
            want = m["fallbacks"].get(name, {}).get("got", typ)
            assert m["tensor_types"][name].lower() == want.lower()
    assert sorted(p.name for p in quant.iterdir() if not p.name.startswith(".")) == sorted([
        m["file"], "imatrix.gguf", "imatrix-calibration.txt", "tensor-types.txt", "quant-manifest.json",
        "manifest.json", "llama-quantize.log", "README.md", "Modelfile", "expert_drop_metadata.json"])
    summary = json.loads((dirs["evaluate_quant"] / "summary.json").read_text())
    assert summary["n"] == 12 and "## Scores" in (dirs["evaluate_quant"] / "README.md").read_text()
    assert f"FROM ./{m['file']}" in (quant / "Modelfile").read_text()

    moeprune(args, tmp_path / "cache", tmp_path / "run2")
    assert all(cached(tmp_path / "run2").values())


def no_gguf_left(*dirs: Path) -> bool:
    return not [p for d in dirs if d.exists() for p in d.rglob("*") if ".gguf" in p.name]


def test_model_dir_without_tokenizer(toolchain, model, tmp_path):
    from moeprune.presets import quant_tier
    from moeprune.quant import gguf_tier

    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    os.remove(bare / "tokenizer.json")
    with pytest.raises(MoePruneError, match=r"has no tokenizer \(tokenizer.json or tokenizer.model\)"):
        gguf_tier.produce(quant_tier("q8_0"), bare, tmp_path / "out", tmp_path / "base")
    assert no_gguf_left(tmp_path / "out", tmp_path / "base")


def test_failed_converter_reports_its_own_message(toolchain, model, tmp_path):
    from moeprune.presets import quant_tier
    from moeprune.quant import gguf_tier

    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["NotARealModelForCausalLM"]}))
    (tmp_path / "out").mkdir()
    with pytest.raises(MoePruneError, match=r"convert_hf_to_gguf.py on .* failed \(exit 1\)(.|\n)*"
                                            r"Model NotARealModelForCausalLM is not supported"):
        gguf_tier.produce(quant_tier("q8_0"), bad, tmp_path / "out", tmp_path / "base")
    assert no_gguf_left(tmp_path / "out", tmp_path / "base")


def test_failed_quantize_and_imatrix_report_their_own_messages(toolchain, ladder, tmp_path):
    from moeprune.quant import gguf_tools, imatrix

    f16_out, m = ladder["f16"]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes((f16_out / m["file"]).read_bytes()[:4096])  # a truncated file
    with pytest.raises(MoePruneError, match=r"llama-quantize Q4_K_M failed(.|\n)*(failed|error)"):
        gguf_tools.quantize(toolchain, broken, tmp_path / "q" / "out.gguf", "Q4_K_M")
    assert no_gguf_left(tmp_path / "q")

    short = tmp_path / "short.txt"
    short.write_text("ADD:1+1=2\n")
    with pytest.raises(MoePruneError, match=r"tokenizes to \d+ tokens; llama-imatrix needs at least 256 \(two chunks of imatrix_ctx=128\)"):
        imatrix.compute(toolchain, f16_out / m["file"], short, tmp_path / "im" / "imatrix.gguf", ctx=128)
    assert no_gguf_left(tmp_path / "im")


def test_tool_failure_without_error_line_says_the_logger_lost_it(tmp_path):
    from moeprune.quant import gguf_tools

    with pytest.raises(MoePruneError, match=r"llama-imatrix failed \(exit 3\):\n\(its logger lost the error line"):
        gguf_tools.run_tool(["sh", "-c", "echo loading; exit 3"], "llama-imatrix", log_file=tmp_path / "x.log")


def test_tensor_type_overrides_reach_the_file_and_win_over_the_cd_rule(toolchain, model, tmp_path):
    from omegaconf import OmegaConf
    from quant_support import toy_corpus
    from test_quant_cd import make_profile

    from moeprune.presets import quant_tier
    from moeprune.quant import gguf_tier

    tier = OmegaConf.merge(quant_tier("q8_0"), {"tensor_types": {r"blk\.0\.attn_q\.weight": "q4_0"}})
    m = gguf_tier.produce(tier, model, tmp_path / "a", tmp_path / "base", model_name="tiny")
    assert m["tensor_types"]["blk.0.attn_q.weight"] == "Q4_0" and m["tensor_types"]["blk.1.attn_q.weight"] == "Q8_0"
    assert (tmp_path / "a" / gguf_tier.TENSOR_TYPE_FILE).read_text() == "blk\\.0\\.attn_q\\.weight=q4_0\n"

    # layer 0 contributes least, so the CD rule gives its experts the low type; the override wins
    profile = make_profile([[[0.1] * 8, [5.0] * 8]], [0, 1])
    cd = OmegaConf.merge(quant_tier("cd_q4_k_m"), {"tensor_types": {r"blk\.0\.ffn_down_exps\.weight": "q8_0"}})
    m = gguf_tier.produce(cd, model, tmp_path / "b", tmp_path / "base", corpus=toy_corpus(16), model_name="tiny",
                          profile=profile)
    lines = m["tensor_type_map"]["lines"]
    assert lines[0] == r"blk\.0\.ffn_down_exps\.weight=q8_0" and r"blk\.0\.ffn_down_exps\.weight=q3_k" in lines
    assert m["tensor_types"]["blk.0.ffn_down_exps.weight"] == "Q8_0"
    assert m["tensor_types"]["blk.0.ffn_gate_up_exps.weight"] == "Q3_K"  # the rest of layer 0 follows the rule


def test_the_imatrix_length_check_counts_what_llama_imatrix_reads(toolchain, ladder, tmp_path):
    """-f drops the file's last newline: at the boundary the text has one token less than it seems."""
    from moeprune.quant import imatrix

    f16_out, m = ladder["f16"]
    text = tmp_path / "edge.txt"
    text.write_text("a" * 14 + "\n")  # BOS + 14 tokens = 15 read, one short of two chunks of 8
    with pytest.raises(MoePruneError, match=r"tokenizes to 15 tokens; llama-imatrix needs at least 16"):
        imatrix.compute(toolchain, f16_out / m["file"], text, tmp_path / "im" / "imatrix.gguf", ctx=8)


@pytest.mark.parametrize("body", ["a{}", "x\\ty{}", "<eos>{}<bos>"], ids=["plain", "with-an-escape", "with-special-tokens"])
@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["one-short", "exactly", "one-over"])
def test_the_length_check_agrees_with_llama_imatrix_at_the_limit(toolchain, ladder, tmp_path, offset, body):
    """Texts of 2*ctx-1, 2*ctx and 2*ctx+1 tokens (llama-tokenize's count): our check refuses exactly
    the texts llama-imatrix itself refuses (it runs here with the check bypassed), special-token
    strings included (each one token to both, not its characters)."""
    from moeprune.quant import gguf_tools, imatrix

    f16 = ladder["f16"][0] / ladder["f16"][1]["file"]
    ctx, want = 8, 16 + offset
    texts = [body.format("a" * k) + "\n" for k in range(40)]
    text = next(t for t in texts if imatrix.token_count(toolchain, f16, t[:-1].encode()) == want)
    (tmp_path / "t.txt").write_text(text)
    try:
        gguf_tools.run_tool([toolchain.tool("llama-imatrix"), "-m", f16, "-f", tmp_path / "t.txt", "-o",
                             tmp_path / "raw.gguf", "-c", ctx, "-b", ctx, "--no-ppl", "--parse-special",
                             "--output-format", "gguf"],
                            "llama-imatrix", log_file=tmp_path / "raw.log")
        tool_accepts = True
    except MoePruneError as e:  # its own message, unless its logger lost it on exit (gguf_tools retries 3 times)
        assert "you need at least 16 tokens" in str(e) or "logger lost the error line" in str(e), str(e)
        tool_accepts = False
    try:
        imatrix.compute(toolchain, f16, tmp_path / "t.txt", tmp_path / "im" / "imatrix.gguf", ctx=ctx)
        we_accept = True
    except MoePruneError as e:
        assert f"tokenizes to {want} tokens; llama-imatrix needs at least 16" in str(e)
        we_accept = False
    assert we_accept == tool_accepts == (offset >= 0)
