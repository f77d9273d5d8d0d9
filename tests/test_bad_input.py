"""Bad input through the real CLI, in-process: exit 2, one `moeprune: error:` line naming the input
and what was expected, nothing written anywhere (no run dir, no cache), the model byte-identical."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from moeprune import artifacts

SMALL = ["calibration.samples_per_class=4", "bench.n_per_class=2"]


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory) -> Path:
    from conftest import save_tiny_gemma4

    return save_tiny_gemma4(tmp_path_factory.mktemp("src") / "tiny_gemma4")


def cli(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """moeprune's main() with this argv: (exit code, stderr)."""
    from moeprune import cli as moeprune_cli

    err, code = io.StringIO(), 0
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    old_argv, sys.argv = sys.argv, ["moeprune", *argv]
    try:
        with contextlib.redirect_stderr(err):
            moeprune_cli.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return code, err.getvalue()


def _truncate(model: Path) -> None:
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _shard_index(model: Path) -> None:
    header = json.loads((model / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (model / "model.safetensors").read_bytes()[:8], "little")])
    names = [n for n in header if n != "__metadata__"]
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    (model / "model.safetensors").unlink()


def _config(**changes):
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))
    return edit


def _drop_map(text: str):
    def write(model: Path) -> None:
        (model.parent / "map.json").write_text(text)
    return write


def _corrupt_generation_cache(model: Path) -> None:
    (model.parent / "cache").mkdir()
    (model.parent / "cache" / "generations.sqlite").write_bytes(b"not sqlite " * 500)


def _tokenizer_past_the_embedding(model: Path) -> None:
    """A tokenizer with ids past config.json's vocab_size (another model's, a grown one)."""
    from tokenizers import Tokenizer

    size = json.loads((model / "config.json").read_text())["vocab_size"]
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(size + 8 - tok.get_vocab_size(with_added_tokens=True))])
    tok.save(str(model / "tokenizer.json"))


def _beside(rel: str, text: str, encoding: str = "utf-8"):
    """Write a user file next to the model copy (in the test's tmp dir)."""
    def write(model: Path) -> None:
        path = model.parent / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode(encoding))
    return write


# (id, overrides, message, how to break a copy of the model first)
CASES = [
    ("run dir is the model dir", ["hydra.run.dir={model}"], "is inside the input model", None),
    ("run dir inside the model dir", ["hydra.run.dir={model}/run"], "is inside the input model", None),
    ("cache inside the model dir", ["env:MOEPRUNE_CACHE={model}/cache"], "paths.cache_dir", None),
    ("layer-wise work dir inside the model dir", ["profile.work_dir={model}/work"],
     "profile.work_dir {model}/work is inside the input model", None),
    ("empty MOEPRUNE_CACHE", ["env:MOEPRUNE_CACHE="], "paths.cache_dir is empty", None),
    ("empty run dir", ["hydra.run.dir="], "hydra.run.dir is empty", None),
    ("run dir is a file", ["hydra.run.dir={tmp}/afile"], "is a file: expected a directory", None),
    ("cache is a file", ["env:MOEPRUNE_CACHE={tmp}/afile"], "paths.cache_dir", None),
    ("misspelt recipe", ["recipe=v8_coder"], "recipe=v8_coder: no such preset; expected one of", None),
    ("misspelt hparams_search", ["hparams_search=foo"], "hparams_search=foo: no such preset", None),
    ("nan alpha", ["prune.shared_ffn_alpha=nan"], "prune.shared_ffn_alpha=nan: expected a finite factor", None),
    ("negative alpha", ["prune.shared_ffn_alpha=-1"], "prune.ablate_shared_ffn=true", None),
    ("zero alpha", ["prune.shared_ffn_alpha=0"], "zeroes or negates the shared FFN", None),
    ("quant stage without a tier", ["stage=quant"], "stage=quant, but the config disables the quant stage", None),
    ("zero batch", ["calibration.batch_size=0"], "calibration.batch_size=0: expected at least 1", None),
    ("zero shard size", ["prune.max_shard_bytes=0"], "prune.max_shard_bytes=0: expected at least 1 MiB", None),
    ("negative empty threshold", ["evaluate.empty_threshold=-1"], "evaluate.empty_threshold=-1", None),
    ("negative n_per_class", ["bench.n_per_class=-5"], "bench.n_per_class=-5: expected at least 1", None),
    ("zero sandbox workers", ["bench=humaneval", "bench.sandbox.workers=0"],
     "bench.sandbox.workers=0: expected at least 1 program at once", None),
    ("negative sandbox wall time", ["bench=humaneval", "bench.sandbox.wall_s=-1"],
     "bench.sandbox.wall_s=-1.0: expected seconds > 0", None),
    ("zero samples per class", ["calibration.samples_per_class=0"], "calibration.samples_per_class=0", None),
    ("cd fraction over one", ["quant_tier=cd_q4_k_m", "quant_tier.cd.high_fraction=1.5"],
     "quant_tier.cd.high_fraction=1.5: expected a fraction in [0, 1]", None),
    ("negative llama.cpp threads", ["quant_tier=q4_k_m", "quant_tier.threads=-2"],
     "quant_tier.threads=-2: expected at least 0", None),
    ("cuda without a GPU", ["model.device=cuda"], "model.device=cuda: this machine has 0 CUDA", None),
    ("tpu", ["model.device=tpu"], "model.device='tpu': expected auto, cpu, cuda", None),
    ("truncated shard", [], "truncated shard", _truncate),
    ("missing shard", [], "names shard files that are missing", _shard_index),
    ("no weights", [], "no model.safetensors", lambda m: (m / "model.safetensors").unlink()),
    ("truncated config.json", [], "config.json is unreadable", lambda m: (m / "config.json").write_text('{"model_')),
    ("config.json an array", [], "holds a JSON list: expected a JSON object", lambda m: (m / "config.json").write_text("[]")),
    ("num_experts a string", [], "num_experts='eight': expected a positive integer", _config(num_experts="eight")),
    ("num_experts disagrees with the weights", [], "experts.down_proj: shape [8, 64, 32], expected 6 experts on axis 0 (config.json: num_experts=6)",
     _config(num_experts=6)),
    ("missing tokenizer", [], "has no tokenizer", lambda m: [(m / f).unlink() for f in ("tokenizer.json",)]),
    ("duplicate keys in a drop map", ["keep.drop_map={tmp}/map.json"], "duplicate keys ['0']",
     _drop_map('{"0": [1, 2], "0": [3, 4], "1": [1, 2]}')),
    ("drop map naming a missing layer", ["keep.drop_map={tmp}/map.json"], "keep.drop_map=",
     _drop_map('{"0": [1, 2], "7": [1, 2]}')),
    ("a malformed map for the prune stage alone", ["stage=prune", "keep.drop_map={tmp}/map.json"],
     "keep.drop_map=", _drop_map('{"0": [1, 2], "1": [1, 2, 3]}')),
    ("a floor band above the keep count", ["floor_clamp=band_24_40"], "floor_clamp.band=[24, 40]: expected [lo, hi]",
     None),
    ("calibration files that are not there", ["calibration=reference_v7", "calibration.data_dir={tmp}/nodata"],
     "input calibration.generic_math[0] not found", None),
    ("llama_cpp for a pruned checkpoint without a gguf", ["stages.evaluate=true", "backend=llama_cpp",
                                                          "stages.evaluate_base=false"],
     "backend=llama_cpp serves a .gguf, and the pruned checkpoint holds none", None),
    ("llama_cpp for a base model without a gguf", ["stages.evaluate=true", "stage=evaluate_base", "backend=llama_cpp"],
     "expected exactly one .gguf file (found 0); set backend.gguf", None),
    ("a quant tier that cannot be produced", ["quant_tier=q4_k_m", "quant_tier.type=Q9_X"],
     "type='Q9_X' is not a llama-quantize type", None),
    ("URL without a scheme", ["backend=openai", "backend.base_url=localhost:8000/v1"],
     "backend.base_url=localhost:8000/v1: expected an http:// or https:// URL", None),
    ("garbage llama.cpp sdist", ["quant_tier=q4_k_m", "env:MOEPRUNE_LLAMACPP_HOME={tmp}/llama_home",
                                 "env:MOEPRUNE_LLAMACPP_SDIST={tmp}/sdist/llama_cpp_python-0.3.36.tar.gz"],
     "is not a readable sdist", lambda m: (m.parent / "sdist").mkdir() or (
         m.parent / "sdist" / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"garbage" * 100)),
    ("corrupt generations.sqlite", ["stages.evaluate=true"], "generations.sqlite is not a usable generation cache",
     _corrupt_generation_cache),
    ("an unclosed bracket", ["keep.drop_fraction=[", "stage=dropmap"],
     "keep.drop_fraction=[: cannot parse this override (no viable alternative at input '['); expected key=value", None),
    ("an unquoted non-ASCII path", ["model.path=/data/tøy mødel"],
     "quote a value that holds spaces, brackets, commas or non-ASCII characters: \"model.path='/data/tøy mødel'\"",
     None),
    ("a sweep range of words", ["-m", "hparams_search=toy_recipe", "hydra.sweeper.params.strategy.protect_top=range(a,b)"],
     "protect_top=range(a,b): cannot parse this override (TypeError while evaluating 'range(a,b)'", None),
    ("a stage whose input stage is disabled", ["stages.profile=false", "stage=dropmap"],
     "stage dropmap needs profile, which is disabled: expected stages.profile=true", None),
    ("a malformed preset on the search path", ["hydra.searchpath=[file://{tmp}/presets]", "strategy=broken"],
     "{tmp}/presets/strategy/broken.yaml, line 5, column 1: not valid YAML (while parsing a flow sequence",
     _beside("presets/strategy/broken.yaml", "defaults:\n  - max\n  - _self_\nalpha: [1.0, 2.0\n")),
    ("a tokenizer whose ids pass the embedding", [], "but {model}/config.json has vocab_size=",
     _tokenizer_past_the_embedding),
    ("a Latin-1 calibration file", ["calibration.classes.generic_math=[{{kind:jsonl,path:{tmp}/latin.jsonl}}]"],
     "calibration.classes.generic_math[0]: {tmp}/latin.jsonl:2 is not UTF-8 (byte 0xe9",
     _beside("latin.jsonl", '{"text": "plain"}\n{"text": "caf\u00e9 cr\u00e8me"}\n', "latin-1")),
    ("a bench data file that is not JSON", ["stages.evaluate=true", "bench=gsm8k_100", "bench.data.path={tmp}/rows.jsonl"],
     "bench gsm8k_100: data.path {tmp}/rows.jsonl:2 is not JSON (Expecting property name enclosed in double quotes",
     _beside("rows.jsonl", '{"question": "a", "answer": "1"}\n{"question": "b", answer: 2}\n')),
    ("a misspelt optimized_metric stage", ["optimized_metric=evaluat.score"],
     "optimized_metric=evaluat.score: no stage 'evaluat'; expected <stage>.<key> with a stage of", None),
    ("a sweep no trial of which can run", ["-m", "hparams_search=toy_recipe", "keep.experts_per_layer=1"],
     "no trial of this sweep can run: cannot keep 1 experts per layer", None),
    ("top_k above num_experts in config.json", ["stage=dropmap"],
     "config.json routes each token to top_k=99 experts of num_experts=", _config(top_k_experts=99)),
    ("the openai backend without a base_url", ["stages.evaluate=true", "backend=openai"],
     "backend.base_url is not set: expected the server's OpenAI API root", None),
    ("a calibration prompt past its tier's max_tokens", ["calibration.tiers.short.max_tokens=8", "stage=profile"],
     "exceeds the tier's max_tokens=8", None),
    ("a new calibration class on the command line", ["+calibration.classes.bogus=[{{kind:toy}}]"],
     "calibration.classes.bogus takes typed entries that OmegaConf cannot build from a command-line list", None),
]


@pytest.mark.parametrize("overrides, message, breakage", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(shared_model, tmp_path, overrides, message, breakage):
    assert_refused(shared_model, tmp_path, overrides, message, breakage)


@pytest.fixture(scope="module")
def floor_profile(shared_model, tmp_path_factory) -> Path:
    """A good profile of the test model, computed once, as a user's floor_clamp.profile dir."""
    cache = tmp_path_factory.mktemp("floor_cache")
    code, stderr = cli([f"model.path={shared_model}", f"hydra.run.dir={cache}/run", *SMALL, "stage=profile"],
                       {"MOEPRUNE_CACHE": str(cache)})
    assert not code, stderr
    (made,) = [p for p in (cache / "profile").iterdir() if not p.name.startswith(".")]
    return made


def _stats(fill):
    def breakage(profile_dir: Path) -> None:
        from safetensors.torch import load_file, save_file

        stats = load_file(str(profile_dir / "profile.safetensors"))
        save_file({k: fill(v) for k, v in stats.items()}, str(profile_dir / "profile.safetensors"))
    return breakage


def _one_more_class(profile_dir: Path) -> None:
    meta = json.loads((profile_dir / "profile.json").read_text())
    (profile_dir / "profile.json").write_text(json.dumps({**meta, "classes": [*meta["classes"], "extra"]}))


def _truncated(profile_dir: Path) -> None:
    data = (profile_dir / "profile.safetensors").read_bytes()
    (profile_dir / "profile.safetensors").write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("breakage, message", [
    (_stats(lambda v: v * float("nan")), "mostly non-finite in layers"),
    (_stats(lambda v: v * 0), "is all zero in layers"),
    (_truncated, "not a readable profile"),
    (_one_more_class, "has shape"),
], ids=["NaN statistics", "all-zero statistics", "a truncated safetensors", "a class list longer than its tensors"])
def test_a_users_broken_floor_profile_is_refused_without_asking_to_delete_it(shared_model, tmp_path, floor_profile,
                                                                             breakage, message):
    def broken_copy(model: Path) -> None:
        breakage(Path(shutil.copytree(floor_profile, model.parent / "floor")))

    line = assert_refused(shared_model, tmp_path, ["stage=dropmap", "floor_clamp.top=1",
                                                   "floor_clamp.profile={tmp}/floor"], message, broken_copy)
    assert f"floor_clamp.profile={tmp_path}/floor: " in line and "point floor_clamp.profile at" in line
    assert "deleting" not in line and "cache.refresh" not in line  # the dir is the user's input


@pytest.mark.parametrize("argv, message", [
    (["compare"], "moeprune compare: the following arguments are required: RUN_A; expected: moeprune compare"),
    (["report"], "moeprune report: the following arguments are required: DIR; expected: moeprune report"),
], ids=["compare", "report"])
def test_a_subcommand_without_its_arguments_says_what_it_expects(tmp_path, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stderr = cli(argv)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"moeprune: error: {message}"), stderr
    assert list(tmp_path.iterdir()) == []


def test_an_mxfp4_checkpoint_without_accelerate_names_the_extra(shared_model, tmp_path, monkeypatch):
    """gpt-oss as released (MXFP4 experts) loads through accelerate, which only the mxfp4 extra installs."""
    from tiny_moe import save_family

    def gpt_oss_mxfp4(model: Path) -> None:
        shutil.rmtree(model)
        save_family("gpt_oss", model, "mxfp4")

    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` raises ImportError
    assert_refused(shared_model, tmp_path, ["stage=profile"],
                   'quantization_config.quant_method=mxfp4 loads through accelerate, which is not installed: '
                   'expected accelerate>=1.1.0 (pip install -e ".[mxfp4]")', gpt_oss_mxfp4)


def test_logger_wandb_without_wandb_writes_no_run_dir(shared_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert_refused(shared_model, tmp_path, ["logger=wandb"], "logger=wandb needs the wandb package", None)


def test_with_accelerate_the_loader_reads_an_mxfp4_checkpoint(tmp_path):
    pytest.importorskip("accelerate", reason='pip install -e ".[mxfp4]" to load MXFP4 checkpoints')
    from tiny_moe import save_family

    from moeprune.models import load_model

    model = load_model(save_family("gpt_oss", tmp_path / "gpt_oss", "mxfp4"), "float32", "cpu")
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype.is_floating_point  # dequantized on CPU


def assert_refused(shared_model: Path, tmp_path: Path, overrides, message: str, breakage) -> str:
    """The CLI on (a broken copy of) the model: exit 2, one error line with `message`, nothing written."""
    model = shared_model
    if breakage is not None:
        model = Path(shutil.copytree(shared_model, tmp_path / "model"))
        breakage(model)
    (tmp_path / "afile").write_text("not a dir\n")
    before, source = _tree(tmp_path), _tree(shared_model)
    fill = {"model": model, "tmp": tmp_path}
    env = {"MOEPRUNE_CACHE": str(tmp_path / "cache")}
    other_bench = any(o.startswith("bench=") for o in overrides)  # its own knobs: n, not n_per_class
    small = [o for o in SMALL if not (other_bench and o.startswith("bench."))]
    argv = ["-m"] * ("-m" in overrides) + [f"model.path={model}", f"hydra.run.dir={tmp_path / 'run'}", *small]
    overrides = [o for o in overrides if o != "-m"]  # a sweep: -m first, as typed
    if "stages.evaluate=true" not in overrides:
        argv.append("stages.evaluate=false")
    for o in overrides:
        if o.startswith("env:"):
            key, value = o[4:].split("=", 1)
            env[key] = value.format(**fill)
        else:
            argv.append(o.format(**fill))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # an empty cache or run dir setting would land here
    try:
        code, stderr = cli(argv, env)
    finally:
        os.chdir(cwd)
    errors = [line for line in stderr.splitlines() if line.startswith("moeprune: error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and message.format(**fill) in errors[0], stderr
    assert "Traceback" not in stderr
    assert _tree(tmp_path) == before, "a refused run writes nothing (no run dir, no cache)"
    assert _tree(shared_model) == source, "the source model stays byte-identical"
    return errors[0]


def _tree(root: Path) -> dict:
    """Every path under root, with a file's bytes (None for a dir)."""
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def test_reusing_a_run_dir_leaves_no_link_of_the_previous_run(shared_model, tmp_path):
    run = tmp_path / "run"
    env = {"MOEPRUNE_CACHE": str(tmp_path / "cache")}
    base = [f"model.path={shared_model}", f"hydra.run.dir={run}", *SMALL, "stages.evaluate=false"]
    assert cli([*base, "stage=prune"], env)[0] == 0
    assert cli([*base, "stage=dropmap", "keep.drop_fraction=0.5"], env)[0] == 0
    listed = json.loads((run / "run.json").read_text())["stages"]
    links = {p.name: p.resolve() for p in run.iterdir() if p.is_symlink()}
    assert links == {name: Path(s["artifact"]) for name, s in listed.items()}
    assert "prune" not in links, "the second run built no pruned model: its run dir must not link the first's"


def test_a_relative_cache_is_linked_by_absolute_paths(shared_model, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, err = cli([f"model.path={shared_model}", "hydra.run.dir=run", *SMALL, "stage=profile"],
                        {"MOEPRUNE_CACHE": "relcache"})
    finally:
        os.chdir(cwd)
    assert code == 0, err
    link = tmp_path / "run" / "profile"
    assert os.readlink(link).startswith("/") and (link / artifacts.MANIFEST).is_file()


def _start_and_kill_in_profile(model: Path, cache: Path, run_dir: Path, sig: int):
    """Start a run, send `sig` while the profile stage's temp dir exists; (exit code, stderr)."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moeprune", f"model.path={model}", f"hydra.run.dir={run_dir}",
                             "calibration.samples_per_class=16", "stage=profile"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(cache.glob("profile/.*.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the profile never started building"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert sig != signal.SIGTERM or proc.returncode == 143, stderr
    return proc.returncode, stderr


SLOW_EXIT = """import atexit, os, pathlib, time
if os.environ.get("EXIT_MARK"):  # registered first, so run last: the interpreter is exiting
    def slow_exit():
        pathlib.Path(os.environ["EXIT_MARK"]).write_text("exiting")
        time.sleep(3)
    atexit.register(slow_exit)
"""


def test_a_sigterm_while_a_completed_run_exits_keeps_exit_status_0(shared_model, tmp_path):
    import signal
    import subprocess
    import time

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_EXIT)
    mark = tmp_path / "exiting"
    env = {**os.environ, "MOEPRUNE_CACHE": str(tmp_path / "cache"), "EXIT_MARK": str(mark),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "moeprune", f"model.path={shared_model}",
                             f"hydra.run.dir={tmp_path / 'run'}", *SMALL, "stage=dropmap"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not mark.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # (a SIGINT inside atexit is swallowed by Python already)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "dropmap" in json.loads((tmp_path / "run" / "run.json").read_text())["stages"]


def test_sigterm_exits_143_with_one_line_and_leaves_no_temp_dir(shared_model, tmp_path):
    import signal

    cache = tmp_path / "cache"
    code, stderr = _start_and_kill_in_profile(shared_model, cache, tmp_path / "run", signal.SIGTERM)
    assert code == 143 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("moeprune:")] == [
        "moeprune: terminated (SIGTERM): finished stages stay cached; run the same command again to go on"]
    assert not list(cache.rglob("*.tmp-*"))


def test_a_temp_dir_left_by_sigkill_is_removed_by_the_next_run(shared_model, tmp_path):
    import signal

    cache = tmp_path / "cache"
    _start_and_kill_in_profile(shared_model, cache, tmp_path / "run", signal.SIGKILL)
    assert list(cache.glob("profile/.*.tmp-*")), "SIGKILL cannot clean up: the temp dir is left"
    code, err = cli([f"model.path={shared_model}", f"hydra.run.dir={tmp_path / 'run2'}", *SMALL, "stage=dropmap"],
                    {"MOEPRUNE_CACHE": str(cache)})
    assert code == 0, err
    assert not list(cache.rglob("*.tmp-*"))


def test_a_live_builders_temp_dir_is_kept(tmp_path):
    import fcntl

    cache = tmp_path / "cache"
    live, dead = cache / "profile" / ".aaa.tmp-1", cache / "profile" / ".bbb.tmp-2"
    live.mkdir(parents=True)
    dead.mkdir()

    def lock(stage, key):
        return cache / ".locks" / f"{stage}-{key}.lock"

    lock("profile", "aaa").parent.mkdir(parents=True)
    with open(lock("profile", "aaa"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: flock conflicts within a process too
        assert artifacts.remove_dead_temps(cache, ["profile"], lock) == [dead]
    assert live.is_dir() and not dead.exists()


def test_ctrl_c_exits_130_with_one_line(shared_model, tmp_path, monkeypatch):
    from moeprune import runner

    def interrupted(self, stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "_run_stage", interrupted)
    code, stderr = cli([f"model.path={shared_model}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, "stage=profile"],
                       {"MOEPRUNE_CACHE": str(tmp_path / "cache")})
    assert code == 130 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("moeprune:")] == [
        "moeprune: interrupted: finished stages stay cached; run the same command again to go on"]


def test_a_broken_cached_profile_names_the_artifact_and_how_to_rebuild_it(tmp_path):
    import torch

    from moeprune.errors import MoePruneError
    from moeprune.prune.recipe import check_profile
    from moeprune.profile import Profile

    cached = tmp_path / "cache" / "profile" / "abc123"
    zeros = torch.zeros(2, 1, 4)
    cached.mkdir(parents=True)
    Profile(["a", "b"], [0], 4, {"count": zeros, "wnorm": zeros.clone()}, {"a": 1, "b": 1}).save(cached)
    (cached / artifacts.MANIFEST).write_text("{}")
    with pytest.raises(MoePruneError, match=f"rebuild it by deleting {cached}, or run with cache.refresh=true"):
        check_profile(Profile.load(cached), ("count", "wnorm"))


def test_a_zero_shared_ffn_alpha_runs_when_the_ablation_is_asked_for(shared_model, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, err = cli([f"model.path={shared_model}", f"hydra.run.dir={run}", *SMALL, "stage=prune",
                     "prune.shared_ffn_alpha=0", "prune.ablate_shared_ffn=true"], {"MOEPRUNE_CACHE": str(tmp_path / "c")})
    assert code == 0, err
    pruned = load_file(str(run / "prune" / "model" / "model.safetensors"))
    assert not pruned["model.layers.0.mlp.down_proj.weight"].any(), "alpha=0 zeroes the shared FFN's down projection"


def test_the_prune_stage_with_a_given_map_profiles_nothing_and_prunes_what_the_map_says(tmp_path):
    """No calibration pass and no tokenizer for a map the run was given: a copy of the shipped toy
    model without its tokenizer prunes, the cache holds no profile, the checkpoint drops the map's ids."""
    import torch
    from safetensors.torch import load_file

    from moeprune.cli import PKG_DIR

    model = Path(shutil.copytree(PKG_DIR / "toy" / "model", tmp_path / "model"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    drop = {"0": [0, 5, 9, 15], "1": [1, 2, 3, 4], "2": [6, 7, 8, 10], "3": [11, 12, 13, 14]}
    (tmp_path / "map.json").write_text(json.dumps(drop))
    run, cache = tmp_path / "run", tmp_path / "cache"
    code, err = cli([f"model.path={model}", f"hydra.run.dir={run}", "stage=prune",
                     f"keep.drop_map={tmp_path / 'map.json'}"], {"MOEPRUNE_CACHE": str(cache)})
    assert code == 0, err
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["dropmap", "prune"]
    summary = json.loads((run / "dropmap" / "summary.json").read_text())
    assert summary["scored"] is False and summary["keep_per_layer"] == 12
    meta = json.loads((run / "prune" / "model" / "expert_drop_metadata.json").read_text())
    assert meta["dropped"] == drop
    source, pruned = load_file(str(model / "model.safetensors")), load_file(str(run / "prune" / "model" / "model.safetensors"))
    for layer, ids in drop.items():
        kept = [e for e in range(16) if e not in ids]
        for name in ("experts.gate_up_proj", "experts.down_proj", "router.proj.weight"):
            key = f"model.layers.{layer}.{name}"
            assert torch.equal(pruned[key], source[key][kept]), key


def test_a_given_map_is_scored_by_the_profile_when_the_run_computes_one(shared_model, tmp_path):
    drop = {"0": [0, 1], "1": [2, 3]}
    (tmp_path / "map.json").write_text(json.dumps(drop))
    run = tmp_path / "run"
    code, err = cli([f"model.path={shared_model}", f"hydra.run.dir={run}", *SMALL, "stage=dropmap",
                     f"keep.drop_map={tmp_path / 'map.json'}"], {"MOEPRUNE_CACHE": str(tmp_path / "cache")})
    assert code == 0, err
    summary = json.loads((run / "dropmap" / "summary.json").read_text())
    assert (run / "profile").is_symlink() and "scored" not in summary and summary["layers"]["0"]["agg_max"] > 0
    assert json.loads((run / "dropmap" / "drop_map.json").read_text()) == drop


def test_a_run_is_checked_once_by_the_callback_and_not_again_by_the_cli(shared_model, tmp_path, monkeypatch):
    from moeprune import preflight

    checked, real = [], preflight.check_run
    monkeypatch.setattr(preflight, "check_run", lambda cfg, run_dir: (checked.append(run_dir), real(cfg, run_dir))[1])
    code, stderr = cli([f"model.path={shared_model}", f"hydra.run.dir={tmp_path}/run", *SMALL, "stage=profile"],
                       {"MOEPRUNE_CACHE": str(tmp_path / "cache")})
    assert code == 0, stderr
    assert [Path(p).resolve() for p in checked] == [(tmp_path / "run").resolve()]  # the callback's, only
