"""The Gemma 4 26B-A4B workflow at its real widths, every stage through the CLI (docs/fullscale.md).

Writes a random-weight checkpoint with the Gemma 4 26B-A4B text config (`--layers` decoder layers;
hidden 2816, 128 experts top-8, expert width 704, dense FFN 2112, vocab 262144), a synthetic
tokenizer of the full 262144-entry vocabulary in the layout llama.cpp's Gemma 4 converter reads, and
a ten-class calibration dir in the `reference_v7` layout. Then runs `python -m moeprune`:

  1. recipe=v7_coderx (floor from the run's own profile, band [24, 40], 98 kept),
     prune.shared_ffn_alpha=1.2, quant_tier=nvfp4a16, scored through the dequantized reload;
  2. the same with quant_tier=cd_q4_k_m (convert + imatrix + CD map + llama-quantize), the bench
     through llama-server from the GGUF (profile, drop map, prune and the 16-bit evals are cached);
  3. stage=profile alone with a GPU budget below the checkpoint (`profile.device_memory_fraction`),
     so that profile.mode=auto picks the layer-wise profile; its own cache;
  4. `-m hparams_search=gemma4_98e` with --objective-trials trials: the two-stage study's first
     stage (the objective without generation on held-out prompts, no confirmation), each trial's
     seconds and the sweep's peak GPU memory; then the model's teacher-forced and greedy-decode
     throughput at these widths, from which a real-model trial's cost is estimated.

Per stage it prints wall time, peak GPU memory (device-wide, above the idle level), peak host RSS
(the CLI and its children, llama.cpp's tools included) and bytes written, then the checks: the
pruned config's expert count, the GGUF's expert count and tensor types (the 704-wide rows' K-quant
fallbacks named), llama-server's answers, the NVFP4 export's reload, the auto mode's choice.

    python benchmarks/fullscale.py --work /tmp/fs                 # GPU machine (8 layers)
    python benchmarks/fullscale.py --work /tmp/fs --tiny          # CPU dry run: same code, small widths
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# google/gemma-4-26B-A4B-it's text config (its model card and transformers' Gemma 4 plans: global
# layers have 2 KV heads of 512 with K = V, sliding ones 8 of 256 over a 1024 window).
FULL = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, num_experts=128,
            top_k_experts=8, num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
            head_dim=256, global_head_dim=512, attention_k_eq_v=True, sliding_window=1024,
            final_logit_softcapping=30.0, max_position_embeddings=262144)
# The dry run: the same structure, small widths (the expert width stays off a multiple of 256, as 704 is).
TINY = dict(FULL, hidden_size=256, intermediate_size=256, moe_intermediate_size=64, num_experts=128,
            num_attention_heads=2, num_key_value_heads=1, num_global_key_value_heads=1, head_dim=64, global_head_dim=128)
KEEP = 98
CLASSES = ("generic_math", "generic_logic", "generic_code", "generic_science", "generic_creative",
           "generic_multilingual", "targeted_humaneval", "targeted_humanevalplus", "targeted_lcb_medium_55",
           "targeted_gpqa")
STAGE_ORDER = ("profile", "dropmap", "prune", "quant", "evaluate_base", "evaluate", "evaluate_quant")
GB = 1e9


def text_config(layers: int, tiny: bool):
    from transformers import Gemma4TextConfig

    types = ["full_attention" if i % 6 == 5 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    return Gemma4TextConfig(**(TINY if tiny else FULL), num_hidden_layers=layers, layer_types=types,
                            enable_moe_block=True, hidden_size_per_layer_input=0, vocab_size_per_layer_input=262144,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2, architectures=["Gemma4ForCausalLM"])


def write_checkpoint(path: Path, layers: int, tiny: bool) -> dict:
    """Random bf16 weights (std 0.02; norms and scales at one), one shard per decoder layer."""
    from safetensors.torch import save_file
    from transformers import Gemma4ForCausalLM

    config = text_config(layers, tiny)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Gemma4ForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    path.mkdir(parents=True)
    config.save_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    parts: dict[str, list[str]] = {}
    for name in shapes:
        parts.setdefault(f"layer{int(name.split('.')[2]):02d}" if name.startswith("model.layers.") else "rest", []).append(name)
    weight_map, sizes = {}, {}
    for part, names in parts.items():
        tensors = {}
        for name in names:
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale", "layer_scalar")):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
        save_file(tensors, str(path / f"model-{part}.safetensors"), metadata={"format": "pt"})
        weight_map.update({n: f"model-{part}.safetensors" for n in tensors})
        sizes[part] = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"rest": sizes["rest"], "per_layer": max(v for k, v in sizes.items() if k != "rest"),
            "total": sum(sizes.values())}


def write_tokenizer(path: Path, size: int = 262144) -> None:
    """A byte-fallback BPE of exactly `size` entries in the Gemma layout (<pad> <eos> <bos> <unk>, the
    turn markers, 256 byte tokens, ▁ / newline / printable ASCII, then real merges: every pair of
    those characters, then pair + character until the vocabulary is full) and a Gemma 4-style chat
    template. llama.cpp's converter reads it with gguf-py's LlamaHfVocab and needs merges."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    chars = ["\u2581", "\n"] + [chr(c) for c in range(33, 127)]
    for ch in chars:
        vocab[ch] = len(vocab)
    merges = []
    pairs = [(a, b) for a in chars for b in chars]
    for a, b in pairs:
        if len(vocab) == size:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    for (a, b), c in ((p, c) for p in pairs for c in chars):
        if len(vocab) == size:
            break
        if a + b + c not in vocab:
            vocab[a + b + c] = len(vocab)
            merges.append((a + b, c))
    assert len(vocab) == size, len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos>:0 $A:0", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(specials)
    template = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                "{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|turn>", "<turn|>"])
    fast.chat_template = template
    fast.padding_side = "left"
    fast.save_pretrained(path)


def write_calibration(path: Path, per_class: int, verb: str = "Explain", offset: int = 0) -> None:
    """reference_v7's layout: <class>.jsonl, one {"text": prompt} per line, ten classes (another
    verb and offset: held-out prompts the calibration does not hold)."""
    subjects = {"generic_math": "the sum of {a} and {b}", "generic_logic": "whether {a} > {b} implies {b} < {a}",
                "generic_code": "a Python function returning {a} * {b}", "generic_science": "why {a} grams of ice melt",
                "generic_creative": "a poem about {a} stars and {b} moons",
                "generic_multilingual": "'{a} pommes et {b} poires' in German",
                "targeted_humaneval": "def add_{a}(x): return x + {b}  # complete the docstring",
                "targeted_humanevalplus": "def clamp_{a}(x): ...  # edge cases for {b}",
                "targeted_lcb_medium_55": "an O(n log n) solution for {a} intervals and {b} queries",
                "targeted_gpqa": "the energy of a photon of {a} nm, {b} significant figures"}
    path.mkdir(parents=True)
    for c in CLASSES:
        lines = [json.dumps({"text": f"{verb} {subjects[c].format(a=17 * i + 3, b=31 * i + 7)}."})
                 for i in range(offset, offset + per_class)]
        (path / f"{c}.jsonl").write_text("\n".join(lines) + "\n")


class Sampler:
    """Polls, every `every` s: the GPU's used memory (NVML) and the summed RSS of a process and its children."""

    def __init__(self, pid: int, every: float = 0.5):
        import psutil

        self.proc, self.every, self.samples, self.stop = psutil.Process(pid), every, [], threading.Event()
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVIDIA driver: host figures only
            pass
        self.gpu_idle = self._gpu()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _gpu(self) -> int:
        return self.nvml[0].nvmlDeviceGetMemoryInfo(self.nvml[1]).used if self.nvml else 0

    def _rss(self) -> int:
        import psutil

        total = 0
        try:
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self._gpu() - self.gpu_idle, self._rss()))
            self.stop.wait(self.every)

    def close(self) -> list[tuple[float, int, int]]:
        self.stop.set()
        self.thread.join()
        return self.samples


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def run_cli(name: str, args: list[str], work: Path, cache: Path) -> dict:
    """One `python -m moeprune` run, sampled; returns its per-stage table and run.json."""
    run_dir = work / f"run_{name}"
    cache_before = {d.name: _du(d) for d in cache.iterdir()} if cache.is_dir() else {}
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(work / f"{name}.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moeprune", f"hydra.run.dir={run_dir}", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid)
        rc = proc.wait()
    samples = sampler.close()
    text = (work / f"{name}.out").read_text()
    print(f"--- {name}: exit {rc}, {time.time() - t0:.0f} s; last lines:\n" + "\n".join(text.splitlines()[-25:]))
    if rc != 0:  # the stages it finished are still measured; the checks of this run are skipped
        print(f"{name} failed (exit {rc}); full output in {work / (name + '.out')}")
    stages = _stages(run_dir, cache)
    # A stage's samples: from the previous stage's log line ("<stage> built|cached ...") to its own.
    ends, start = {}, t0
    for line in (run_dir / "moeprune.log").read_text().splitlines():
        m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]\[moeprune\]\[INFO\] - (\w+)\s+(built|cached)", line)
        if m and m[2] in stages:
            ends[m[2]] = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    rows = []
    for stage in [s for s in STAGE_ORDER if s in stages]:
        end = ends.get(stage, time.time())
        window = [s for s in samples if start <= s[0] <= end] or [(0, 0, 0)]
        written = _du(Path(stages[stage]["artifact"])) if not stages[stage].get("cached") else 0
        rows.append({"stage": stage, "cached": bool(stages[stage].get("cached")),
                     "wall_s": stages[stage].get("wall_time_s"), "peak_gpu_gb": max(s[1] for s in window) / GB,
                     "peak_rss_gb": max(s[2] for s in window) / GB, "written_gb": written / GB})
        start = end
    # Shared caches the stages fill beside their artifacts (the F16 GGUF + imatrix, layer-wise work).
    for d in cache.iterdir():
        grown = _du(d) - cache_before.get(d.name, 0)
        if d.name in ("gguf_base", "profile_layerwise") and grown > 0:
            owner = "quant" if d.name == "gguf_base" else "profile"
            next(r for r in rows if r["stage"] == owner)["written_gb"] += grown / GB
    return {"rows": rows, "stages": stages, "run_dir": str(run_dir), "output": text, "ok": rc == 0}


def _stages(run_dir: Path, cache: Path) -> dict:
    """run.json's stages; for a failed run (no run.json), the artifacts its log says were built or cached."""
    if (run_dir / "run.json").is_file():
        return json.loads((run_dir / "run.json").read_text())["stages"]
    out = {}
    for line in (run_dir / "moeprune.log").read_text().splitlines():
        m = re.search(r"- (\w+)\s+(built|cached)\s+(\S+)", line)
        if m:
            manifest = json.loads((Path(m[3]) / "manifest.json").read_text()) if (Path(m[3]) / "manifest.json").is_file() else {}
            out[m[1]] = {"artifact": m[3], "cached": m[2] == "cached", "wall_time_s": manifest.get("wall_time_s"),
                         **manifest.get("metrics", {})}
    return out


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n| stage | wall (s) | peak GPU (GB) | peak host RSS (GB) | written (GB) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        wall = "cached" if r["cached"] else f"{r['wall_s']:.1f}"
        print(f"| {r['stage']} | {wall} | {r['peak_gpu_gb']:.1f} | {r['peak_rss_gb']:.1f} | {r['written_gb']:.2f} |")


def check(ok: bool, what: str, checks: list) -> None:
    checks.append((ok, what))
    print(f"[{'ok' if ok else 'FAIL'}] {what}")


def gguf_checks(stages: dict, checks: list) -> None:
    from moeprune.quant.toolchain import cached

    quant = Path(stages["quant"]["artifact"])
    manifest = json.loads((quant / "quant-manifest.json").read_text())
    sys.path.insert(0, str(cached().src / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(quant / manifest["file"]))
    count = next(int(f.contents()) for k, f in reader.fields.items() if k.endswith(".expert_count"))
    check(count == KEEP, f"GGUF {manifest['file']}: expert_count {count}", checks)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    wanted = {}
    for line in (quant / "tensor-types.txt").read_text().splitlines():
        pattern, typ = line.rsplit("=", 1)
        wanted[pattern] = typ.upper()
    fallbacks = manifest.get("fallbacks") or {}
    bad = []
    for name, got in types.items():
        want = next((w for p, w in wanted.items() if re.search(p, name)), None)
        if want is not None and got != want and name not in fallbacks:
            bad.append(f"{name}: {got}, map says {want}")
    check(not bad, f"GGUF tensor types follow the CD map ({len(wanted)} patterns; mismatches {bad[:3]})", checks)
    moves = sorted({f"{fb['wanted']} -> {fb['got']} (rows of {fb['ncols']})" for fb in fallbacks.values()})
    check(bool(fallbacks) and all(types[n] == fb["got"].upper() for n, fb in fallbacks.items()),
          f"{len(fallbacks)} tensors fell back from a 256-block type, as the file holds them: {moves}", checks)
    for name in sorted(fallbacks)[:3]:
        print(f"    e.g. {name}: {types[name]}")


def objective_study(work: Path, model_args: list[str], trials: int, per_class: int) -> dict:
    """The two-stage gemma4_98e study's first stage through the CLI: `trials` trials, each one
    teacher-forced pass over the held-out prompts; per-trial seconds from the study's own clock."""
    import optuna

    sweep, journal = work / "objective_sweep", work / "objective.journal"
    shutil.rmtree(sweep, ignore_errors=True)
    journal.unlink(missing_ok=True)
    env = {**os.environ, "MOEPRUNE_CACHE": str(work / "cache_objective"), "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "hparams_search=gemma4_98e", *model_args, f"bench.n_per_class={per_class}",
            f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.confirm.top=0", f"hydra.sweeper.storage=journal:{journal}",
            f"hydra.sweep.dir={sweep}"]
    t0 = time.time()
    with open(work / "objective.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moeprune", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid)
        rc = proc.wait()
    samples = sampler.close()
    text = (work / "objective.out").read_text()
    print(f"--- objective study: exit {rc}, {time.time() - t0:.0f} s; last lines:\n" + "\n".join(text.splitlines()[-12:]))
    from optuna.storages.journal import JournalFileBackend

    if rc != 0 or not journal.is_file():
        return {"ok": False, "completed": 0, "trial_s": [], "evaluate_s": [], "peak_gpu_gb": 0.0, "peak_rss_gb": 0.0,
                "wall_s": time.time() - t0}
    study = optuna.load_study(study_name="gemma4_98e", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    secs = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    first = {}
    for rec in sorted(sweep.rglob("optuna_trial.json")):
        r = json.loads(rec.read_text())
        if r["number"] == 0:
            first = json.loads((rec.parent / "run.json").read_text())["stages"]
    evals = [json.loads((p.parent / "run.json").read_text())["stages"]["evaluate"]["wall_time_s"]
             for p in sweep.rglob("optuna_trial.json")]
    return {"ok": rc == 0, "completed": len(done), "trial_s": secs, "evaluate_s": evals,
            "first_trial_stages": {k: v.get("wall_time_s") for k, v in first.items()},
            "reference": {k: first.get("reference", {}).get(k) for k in ("samples", "continuation_tokens")},
            "peak_gpu_gb": max(s[1] for s in samples) / GB, "peak_rss_gb": max(s[2] for s in samples) / GB,
            "values": [t.value for t in done], "wall_s": time.time() - t0}


@torch.no_grad()
def throughput(ckpt: Path, batch: int, prompt_len: int, new: int) -> dict:
    """Tokens per second at these widths: teacher-forced (prompt + `new` tokens, one forward) and
    greedy decode (`new` tokens after the prompt, KV cache), the same batch of random prompts."""
    from moeprune.models import load_model

    model = load_model(ckpt, "bfloat16", "cuda")
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(300, vocab, (batch, prompt_len), generator=g).cuda()
    full = torch.randint(300, vocab, (batch, prompt_len + new), generator=g).cuda()

    def timed(fn, reps: int = 3) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    tf = timed(lambda: model(input_ids=full, logits_to_keep=new + 1))
    gen = timed(lambda: model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                       min_new_tokens=new, do_sample=False, pad_token_id=0), reps=1)
    del model
    torch.cuda.empty_cache()
    return {"batch": batch, "prompt": prompt_len, "new": new, "teacher_forced_s": tf, "decode_s": gen,
            "teacher_forced_tok_s": batch * (prompt_len + new) / tf, "decode_tok_s": batch * new / gen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="everything is written here (keep it on a big disk)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="small widths, same structure and vocabulary (CPU dry run)")
    ap.add_argument("--prompts-per-class", type=int, default=4)
    ap.add_argument("--eval-per-class", type=int, default=1, help="toy_suite problems per class for each eval")
    ap.add_argument("--skip", default="", help="comma list of runs to skip: cd_q4_k_m, nvfp4a16, layerwise, objective")
    ap.add_argument("--objective-trials", type=int, default=30, help="trials of the objective study (run 4)")
    ap.add_argument("--heldout-per-class", type=int, default=80, help="held-out prompts per class (about half val)")
    ap.add_argument("--objective-per-class", type=int, default=32, help="val prompts per class each trial scores")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt, cal, cache = work / "checkpoint", work / "calibration", work / "cache"
    t0 = time.time()
    if not (ckpt / "config.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        sizes = write_checkpoint(ckpt, args.layers, args.tiny)
        write_tokenizer(ckpt)
        write_calibration(cal, args.prompts_per_class)
        (work / "sizes.json").write_text(json.dumps(sizes))
    sizes = json.loads((work / "sizes.json").read_text())
    print(f"checkpoint: {args.layers} layers, {sizes['total'] / GB:.2f} GB ({sizes['rest'] / GB:.2f} GB embeddings "
          f"+ {sizes['per_layer'] / GB:.3f} GB per layer), written with tokenizer and calibration in {time.time() - t0:.0f} s")
    free = shutil.disk_usage(work).free
    print(f"disk free after it: {free / GB:.1f} GB")
    common = [f"model.path={ckpt}", f"model.name=gemma4-26b-a4b-{args.layers}l", "model.dtype=bfloat16",
              "calibration=reference_v7", f"calibration.data_dir={cal}", "recipe=v7_coderx",
              "floor_clamp.profile=null", "floor_clamp.map=null", "keep.baseline_map=null",
              "prune.shared_ffn_alpha=1.2", "bench=toy_suite", f"bench.n_per_class={args.eval_per_class}",
              "backend.max_new_tokens=16", "evaluate.resume=false"]
    checks: list = []
    runs = {}
    for tier in ("nvfp4a16", "cd_q4_k_m"):
        if tier in skip:
            continue
        runs[tier] = run_cli(tier, [*common, f"quant_tier={tier}"], work, cache)
        print_table(f"{tier} ({args.layers} layers)", runs[tier]["rows"])
        stages = runs[tier]["stages"]
        if not runs[tier]["ok"]:
            check(False, f"{tier}: the run failed after {list(stages)}", checks)
            continue
        pruned = json.loads((Path(stages["prune"]["artifact"]) / "model" / "config.json").read_text())
        check(pruned.get("num_experts") == KEEP, f"pruned config.json: num_experts {pruned.get('num_experts')}", checks)
        samples = [json.loads(x) for x in (Path(stages["evaluate_quant"]["artifact"]) / "samples.jsonl").read_text().splitlines()]
        print("    first completion through the quant:", repr(samples[0]["completion"][:80]))
        check(all(s["tokens"] > 0 for s in samples),
              f"{tier}: every one of {len(samples)} bench prompts answered through "
              f"{'llama-server' if tier != 'nvfp4a16' else 'the dequantized reload (hf)'}", checks)
        if tier == "cd_q4_k_m":
            gguf_checks(stages, checks)
        else:
            manifest = json.loads((Path(stages["quant"]["artifact"]) / "quant-manifest.json").read_text())
            reload = manifest["reload"]
            check(reload["quantized_tensors"] > 0,
                  f"NVFP4 export reloads: {reload['quantized_tensors']} NVFP4 tensors, weight error median "
                  f"{reload['weight_rel_err'].get('median', float('nan')):.3f}, {manifest['size_bytes'] / GB:.2f} GB, "
                  f"{manifest['bits_per_weight']:.2f} bpw", checks)
        print(f"    auto profile mode chose: {stages['profile'].get('mode')}")
    if "layerwise" not in skip and torch.cuda.is_available():
        cap = 0.5 * sizes["total"] / torch.cuda.get_device_properties(0).total_memory  # half the checkpoint
        args_lw = [*common, "stage=profile", f"profile.device_memory_fraction={cap:.4f}",
                   "calibration.generate_tokens=0"]  # generation needs the whole model on the device
        lw = run_cli("layerwise", args_lw, work, work / "cache_layerwise")
        print_table(f"profile under a {cap * torch.cuda.get_device_properties(0).total_memory / GB:.1f} GB budget", lw["rows"])
        row = lw["rows"][0]
        check(lw["stages"]["profile"].get("mode") == "layerwise" and row["peak_gpu_gb"] * GB < sizes["total"],
              f"auto chose {lw['stages']['profile'].get('mode')} under the budget; peak GPU {row['peak_gpu_gb']:.1f} GB "
              f"vs checkpoint {sizes['total'] / GB:.1f} GB", checks)
    extra = {}
    if "objective" not in skip:
        if not (cal / "heldout").is_dir():
            write_calibration(cal / "heldout", args.heldout_per_class, verb="Describe", offset=1000)
        model_args = [f"model.path={ckpt}", f"model.name=gemma4-26b-a4b-{args.layers}l", "model.dtype=bfloat16",
                      f"calibration.data_dir={cal}", "floor_clamp.profile=null", "floor_clamp.map=null",
                      "keep.baseline_map=null"]
        if args.tiny:  # the CPU dry run: short continuations (a 262144-token vocabulary is slow on a CPU)
            model_args += ["calibration.generate_tokens=8", "bench.max_new_tokens=8"]
        study = objective_study(work, model_args, args.objective_trials, args.objective_per_class)
        extra["objective_study"] = study
        t, e = study["trial_s"], study["evaluate_s"]
        rest = sorted(t[1:]) or [float("nan")]  # trial 0 also builds the profile and the objective's reference

        def median(v):
            return sorted(v)[len(v) // 2] if v else float("nan")

        check(study["ok"] and study["completed"] == args.objective_trials,
              f"objective study: {study['completed']} trials completed; trial 0 (profile + reference + trial) "
              f"{t[0] if t else float('nan'):.1f} s, the others median {median(rest):.1f} s (max {max(rest):.1f}); "
              f"evaluate stage median {median(e):.1f} s; peak GPU {study['peak_gpu_gb']:.1f} GB", checks)
        if torch.cuda.is_available():
            extra["throughput"] = [throughput(ckpt, b, 256, 128) for b in (8, 32)]
            for r in extra["throughput"]:
                print(f"    batch {r['batch']}: teacher-forced {r['teacher_forced_tok_s']:.0f} tok/s, "
                      f"greedy decode {r['decode_tok_s']:.0f} new tok/s")
    summary = {"layers": args.layers, "tiny": args.tiny, "sizes": sizes, "runs": {k: v["rows"] for k, v in runs.items()},
               **extra,
               "checks": [[ok, what] for ok, what in checks], "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "wall_s": round(time.time() - t0, 1)}
    (work / "fullscale.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{sum(ok for ok, _ in checks)}/{len(checks)} checks passed; total {summary['wall_s']} s")
    if not all(ok for ok, _ in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
