"""Train, finish and measure the toy Gemma 4 MoE shipped in ``moeprune/toy/model``.

Train (writes a loadable HF checkpoint, or with ``--state-dict-only`` only the weights + a json)::

    python tools/toy_train.py --out DIR [--steps N] [--device cuda|cpu] [--batch-size B] [--seed S]
        [--time-budget SECONDS] [--state-dict-only] [--init STATE.safetensors] [--per-class-forward]

``--init`` continues from the weights of an earlier ``--state-dict-only`` run (the shipped model
came from five such phases, see docs/toy-world.md); ``--per-class-forward`` runs one forward per
class at its own padded width, which saves compute on CPU.

Finish (build the model from the json's config with the *local* transformers, load the weights
strictly, cast to bfloat16, ``save_pretrained`` with the tokenizer and a greedy generation config,
then measure it and write ``toy_report.json``)::

    python tools/toy_train.py --finish STATE.safetensors --out moeprune/toy/model

Re-measure a saved checkpoint (rewrites its ``toy_report.json``)::

    python tools/toy_train.py --report moeprune/toy/model

The training sequence is ``<bos> prompt answer <eos>`` with the loss on the answer and ``<eos>``
(``--prompt-loss-weight`` adds a small weight on prompt tokens), a mix of every class, AdamW with
warmup + cosine decay, bf16 autocast on CUDA, and a small Switch-style load-balancing loss on every
router (read through forward hooks) so that all 16 experts stay in use.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from moeprune.toy import world
from moeprune.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

STATE_NAME = "toy_state.safetensors"
STATE_JSON = "toy_state.json"
REPORT_NAME = "toy_report.json"


# --------------------------------------------------------------------------- model


def _cpu_threads() -> None:
    """Use every core unless OMP_NUM_THREADS says otherwise (oversubscribed cores spin)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def config_kwargs(tokenizer_len: int) -> dict:
    """The toy model's ``Gemma4TextConfig`` keyword arguments."""
    vocab = int(math.ceil(tokenizer_len / 64) * 64)
    return dict(
        vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, global_head_dim=128,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=vocab,
        enable_moe_block=True, num_experts=16, top_k_experts=2, moe_intermediate_size=128,
        max_position_embeddings=256, sliding_window=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        architectures=["Gemma4ForCausalLM"],
    )


def build_model(kwargs: dict):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(**kwargs)
    cfg.architectures = ["Gemma4ForCausalLM"]
    return Gemma4ForCausalLM(cfg)


def set_experts_impl(model, impl: str) -> None:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = impl


# --------------------------------------------------------------------------- data


def _make_chunk(args: tuple[str, int, str, int]) -> list[tuple[str, str]]:
    cls, n, split, seed = args
    return [(t.prompt, t.answer) for t in world.make_tasks(cls, n, split, seed)]


def make_task_pool(n_per_class: int, split: str, seed: int, workers: int = 1,
                   chunk: int = 20_000) -> dict[str, list[tuple[str, str]]]:
    """``n_per_class`` tasks of every class (train: drawn in chunks of distinct seeds)."""
    jobs = []
    for cls in world.CLASSES:
        if split == "train":
            k = max(1, math.ceil(n_per_class / chunk))
            jobs += [(cls, min(chunk, n_per_class - i * chunk), split, seed * 1000 + i) for i in range(k)]
        else:
            jobs.append((cls, n_per_class, split, seed))
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_make_chunk, jobs)
    else:
        results = [_make_chunk(j) for j in jobs]
    out: dict[str, list[tuple[str, str]]] = {c: [] for c in world.CLASSES}
    for (cls, *_), res in zip(jobs, results):
        out[cls].extend(res)
    return out


class EncodedPool:
    """One class's tasks as a right-padded id tensor, with the start of the answer of each row."""

    def __init__(self, tok, pairs: Sequence[tuple[str, str]], device: str | torch.device):
        # A private copy: a tokenizer that has padded a batch keeps padding enabled on its backend.
        backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        prompts = [e.ids for e in backend.encode_batch([p for p, _ in pairs], add_special_tokens=True)]
        answers = [e.ids for e in backend.encode_batch([a for _, a in pairs], add_special_tokens=False)]
        seqs = [p + a + [EOS_ID] for p, a in zip(prompts, answers)]
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        ids = np.full((len(seqs), int(lens.max())), PAD_ID, dtype=np.int64)
        ids[np.arange(ids.shape[1])[None, :] < lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
        self.ids = torch.from_numpy(ids).to(device)
        self.plen = torch.tensor([len(p) for p in prompts], device=device)
        self.len = torch.from_numpy(lens).to(device)

    def __len__(self) -> int:
        return self.ids.shape[0]


def collate(pools: Sequence[EncodedPool], rows: Sequence[torch.Tensor], prompt_w: float,
            width: int | None = None):
    """(input_ids, targets, weights, answer_mask): next-token targets, weight 1 on answer+eos,
    ``prompt_w`` on prompt tokens. ``width`` fixes the padded length (no host sync)."""
    if width is None:
        width = max(int(p.len[r].max()) for p, r in zip(pools, rows) if len(r))
    parts = [F.pad(p.ids[r, :width], (0, max(0, width - p.ids.shape[1])), value=PAD_ID)
             for p, r in zip(pools, rows) if len(r)]
    ids = torch.cat(parts)
    plen = torch.cat([p.plen[r] for p, r in zip(pools, rows) if len(r)])
    slen = torch.cat([p.len[r] for p, r in zip(pools, rows) if len(r)])
    pos = torch.arange(1, width, device=ids.device)[None, :]  # position of the predicted token
    answer = (pos >= plen[:, None]) & (pos < slen[:, None])
    prompt = (pos >= 2) & (pos < plen[:, None])  # never weigh predicting the tag after <bos>
    weights = answer.float() + prompt_w * prompt.float()
    return ids[:, :-1], ids[:, 1:], weights, answer


# --------------------------------------------------------------------------- router hooks


class RouterTap:
    """Forward hooks on every ``layer.router``: keeps (router_probabilities, top_k_index)."""

    def __init__(self, model):
        self.records: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.records.append(None)
            self.handles.append(layer.router.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def fn(module, inputs, output):
            self.records[i] = (output[0], output[2])
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def load_balance_loss(records, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style aux loss E * sum_e f_e P_e over the tokens in ``mask``, averaged over layers.
    ``records``: per layer (router_probabilities, top_k_index), as a RouterTap keeps them."""
    m = mask.reshape(-1).float()  # no boolean indexing: no host sync
    total = 0.0
    for probs, idx in records:
        p = (probs.float() * m[:, None]).sum(0) / m.sum()
        counts = torch.zeros(num_experts, device=probs.device).index_add_(
            0, idx.reshape(-1), m.repeat_interleave(idx.shape[-1]))
        f = counts / counts.sum()
        total = total + num_experts * (f.detach() * p).sum()
    return total / len(records)


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def teacher_forced_exact(model, pool: EncodedPool, batch_size: int = 512) -> float:
    """Share of rows whose every answer token (and <eos>) is the argmax: equal to greedy exact match."""
    good = 0
    for s in range(0, len(pool), batch_size):
        r = torch.arange(s, min(s + batch_size, len(pool)), device=pool.ids.device)
        inp, tgt, _, ans = collate([pool], [r], 0.0)
        att = (inp != PAD_ID).long()
        att[:, 0] = 1
        logits = model(input_ids=inp, attention_mask=att).logits
        ok = (logits.argmax(-1) == tgt) | ~ans
        good += int(ok.all(-1).sum())
    return good / len(pool)


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], batch_size: int = 256,
             max_new_tokens: int = world.MAX_NEW_TOKENS) -> list[str]:
    """Greedy completions (``model.generate(do_sample=False)``, left-padded batches)."""
    out: dict[int, str] = {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tok.padding_side = "left"
    dev = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(dev)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=PAD_ID, eos_token_id=EOS_ID)
        for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:].tolist()):
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            out[i] = tok.decode(row, skip_special_tokens=True)
    return [out[i] for i in range(len(prompts))]


def generation_accuracy(model, tok, tasks: dict[str, list[world.Task]], batch_size: int = 256):
    acc, fails = {}, {}
    for cls, ts in tasks.items():
        comps = generate(model, tok, [t.prompt for t in ts], batch_size)
        ok = [world.is_correct(t, c) for t, c in zip(ts, comps)]
        acc[cls] = sum(ok) / len(ok)
        fails[cls] = [{"prompt": t.prompt, "answer": t.answer, "got": c}
                      for t, c, k in zip(ts, comps, ok) if not k][:5]
    return acc, fails


@contextlib.contextmanager
def virtual_drop(model, drop: dict[int, Iterable[int]]):
    """Mask the router logits of dropped experts to -inf (the pruned model's routing)."""
    handles = []
    for li, experts in drop.items():
        ex = sorted(set(int(e) for e in experts))
        if not ex:
            continue

        def fn(module, inputs, output, ex=ex):
            output = output.clone()
            output[..., ex] = float("-inf")
            return output

        handles.append(model.model.layers[li].router.proj.register_forward_hook(fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def routing_mass(model, tok, tasks: dict[str, list[world.Task]], batch_size: int = 256) -> torch.Tensor:
    """[class, layer, expert] routed mass: the top-k router probabilities renormalized to sum to 1
    per token (``per_expert_scale`` left out), summed over every prompt and answer token
    (``<bos>`` and padding excluded), on a teacher-forced pass over ``prompt + answer``."""
    n_layers = len(model.model.layers)
    n_exp = model.config.num_experts
    mass = torch.zeros(len(tasks), n_layers, n_exp, dtype=torch.float64)
    tap = RouterTap(model)
    dev = next(model.parameters()).device
    try:
        for ci, (cls, ts) in enumerate(tasks.items()):
            pool = EncodedPool(tok, [(t.prompt, t.answer) for t in ts], dev)
            for s in range(0, len(pool), batch_size):
                r = torch.arange(s, min(s + batch_size, len(pool)), device=dev)
                ids = pool.ids[r]
                keep = (torch.arange(ids.shape[1], device=dev)[None] < (pool.len[r] - 1)[:, None])
                keep[:, 0] = False  # <bos>; the trailing <eos> is excluded by len - 1
                att = (ids != PAD_ID).long()
                att[:, 0] = 1
                model(input_ids=ids, attention_mask=att)
                m = keep.reshape(-1)
                for li, (probs, idx) in enumerate(tap.records):
                    w = probs.float().gather(1, idx)
                    w = w / w.sum(-1, keepdim=True)
                    mass[ci, li].index_add_(0, idx[m].reshape(-1).cpu(), w[m].reshape(-1).double().cpu())
    finally:
        tap.remove()
    return mass


def routing_specificity(mass: torch.Tensor, classes: Sequence[str], top: int = 4) -> dict:
    """Per class: the share of its routed mass on its top-``top`` experts of each layer (own) vs
    the mean share the other classes put on those same experts (others)."""
    share = mass / mass.sum(-1, keepdim=True)
    n_cls, n_layers, _ = share.shape
    out = {}
    for c in range(n_cls):
        own_l, oth_l, tops = [], [], []
        for li in range(n_layers):
            t = share[c, li].topk(top).indices
            own = float(share[c, li, t].sum())
            oth = float(sum(share[o, li, t].sum() for o in range(n_cls) if o != c) / (n_cls - 1))
            own_l.append(own)
            oth_l.append(oth)
            tops.append(sorted(int(x) for x in t))
        out[classes[c]] = {
            "own_share": sum(own_l) / n_layers, "others_share": sum(oth_l) / n_layers,
            "ratio": (sum(own_l) / max(sum(oth_l), 1e-12)),
            "own_share_per_layer": own_l, "others_share_per_layer": oth_l, "top_experts": tops,
        }
    return out


def drop_sensitivity(model, tok, spec: dict, tasks: dict[str, list[world.Task]]) -> dict:
    """Teacher-forced exact match of every class with each class's top experts dropped."""
    dev = next(model.parameters()).device
    pools = {c: EncodedPool(tok, [(t.prompt, t.answer) for t in ts], dev) for c, ts in tasks.items()}
    out = {"none": {c: teacher_forced_exact(model, p) for c, p in pools.items()}}
    for cls, s in spec.items():
        with virtual_drop(model, dict(enumerate(s["top_experts"]))):
            out[cls] = {c: teacher_forced_exact(model, p) for c, p in pools.items()}
    return out


# --------------------------------------------------------------------------- training


def train(args) -> dict:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        _cpu_threads()
    t0 = time.time()
    workers = min(16, os.cpu_count() or 1)
    # Draw the data before CUDA starts (the pool forks).
    train_pairs = make_task_pool(args.pool_per_class, "train", args.seed, workers)
    test_pairs = make_task_pool(args.eval_n, "test", 0, 1)
    tok = build_tokenizer()
    kwargs = config_kwargs(len(tok))
    model = build_model(kwargs)
    if args.init:
        load_state(model, args.init)
        print(f"initialized from {args.init}", flush=True)
    model = model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {kwargs['vocab_size']}", flush=True)
    pools = [EncodedPool(tok, train_pairs[c], dev) for c in world.CLASSES]
    test_pools = [EncodedPool(tok, test_pairs[c], dev) for c in world.CLASSES]
    print(f"data: {sum(len(p) for p in pools)} train sequences in {time.time() - t0:.1f}s", flush=True)

    cw = {c: 1.0 for c in world.CLASSES}
    for item in filter(None, (args.class_weights or "").split(",")):
        k, v = item.split("=")
        if k not in cw:
            raise ValueError(f"--class-weights: unknown class {k!r}")
        cw[k] = float(v)
    tot = sum(cw.values())
    counts = [round(args.batch_size * cw[c] / tot) if cw[c] > 0 else 0 for c in world.CLASSES]

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt_kw = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8, **opt_kw)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and args.amp == "bf16"
           else contextlib.nullcontext())
    tap = RouterTap(model)
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)

    width = max(p.ids.shape[1] for p, k in zip(pools, counts) if k)

    def batch():
        rows = [torch.randint(0, len(p), (k,), device=dev, generator=gen) if k else
                torch.zeros(0, dtype=torch.long, device=dev) for p, k in zip(pools, counts)]
        return collate(pools, rows, args.prompt_loss_weight, width)

    def step_fn(lr: float) -> tuple[float, float]:
        for g in opt.param_groups:
            g["lr"] = lr
        if args.per_class_forward:  # one forward per class, each padded to its own width (CPU)
            parts = []
            for p, k in zip(pools, counts):
                if k:
                    r = torch.randint(0, len(p), (k,), device=dev, generator=gen)
                    parts.append(collate([p], [r], args.prompt_loss_weight))
        else:
            parts = [batch()]
        with amp:
            ce_sum, w_sum, recs, masks = 0.0, 0.0, [], []
            for inp, tgt, w, _ in parts:
                logits = model(input_ids=inp, use_cache=False).logits
                ce_sum = ce_sum + (F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                   tgt.reshape(-1), reduction="none") * w.reshape(-1)).sum()
                w_sum = w_sum + w.sum()
                recs.append(list(tap.records))
                masks.append((inp != PAD_ID).reshape(-1))
            ce = ce_sum / w_sum
            # balance over the whole mixed batch, never per class (that would fight specialisation)
            records = [(torch.cat([r[li][0] for r in recs]), torch.cat([r[li][1] for r in recs]))
                       for li in range(len(recs[0]))]
            aux = load_balance_loss(records, torch.cat(masks), kwargs["num_experts"])
            loss = ce + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(ce.detach()), float(aux.detach())

    # Pick the experts implementation: the faster of grouped_mm and eager that runs (lr 0 steps).
    impl = args.experts_impl
    model.train()
    if impl == "auto":
        times = {}
        for cand in ("grouped_mm", "eager"):
            set_experts_impl(model, cand)
            try:
                step_fn(0.0)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.time()
                for _ in range(3):
                    step_fn(0.0)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[cand] = (time.time() - t) / 3
            except Exception as e:  # noqa: BLE001 - any failure rules the candidate out
                print(f"{cand} experts failed ({type(e).__name__}: {e})", flush=True)
        print("experts step times (s):", {k: round(v, 4) for k, v in times.items()}, flush=True)
        impl = min(times, key=times.get)
    set_experts_impl(model, impl)
    print(f"experts implementation: {impl}", flush=True)

    log: list[dict] = []
    model.train()
    total = args.steps
    t_train = t_probe = time.time()
    step = 0
    ema = None
    while step < total:
        if args.time_budget and step in (10, 60):  # time steps 10-60: the first ones run slow
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step == 10:
                t_probe = time.time()
        if step == 60 and args.time_budget:
            per = (time.time() - t_probe) / 50
            fit = step + int((args.time_budget - (time.time() - t0)) / (per * 1.05))
            if fit < total:
                print(f"time budget: {per * 1000:.1f} ms/step -> {fit} steps instead of {total}", flush=True)
                total = max(fit, 100)
        warm = min(args.warmup, total // 10)
        if step < warm:
            lr = args.lr * (step + 1) / warm
        else:
            prog = (step - warm) / max(1, total - warm)
            lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))
        ce, aux = step_fn(lr)
        ema = ce if ema is None else 0.98 * ema + 0.02 * ce
        step += 1
        if step % args.log_every == 0 or step == total:
            rec = {"step": step, "loss": round(ema, 5), "aux": round(aux, 4), "lr": lr,
                   "elapsed_s": round(time.time() - t_train, 1)}
            if step % args.eval_every == 0 or step == total:
                model.eval()
                rec["test_exact"] = {c: round(teacher_forced_exact(model, p), 4)
                                     for c, p in zip(world.CLASSES, test_pools)}
                model.train()
            log.append(rec)
            print(json.dumps(rec), flush=True)
    tap.remove()
    model.eval()
    wall = time.time() - t_train
    init_info = None
    if args.init and (args.init.parent / STATE_JSON).exists():
        prev = json.loads((args.init.parent / STATE_JSON).read_text())
        init_info = {k: v for k, v in prev.items() if k not in ("config_kwargs", "log")}
        init_info["log"] = prev.get("log", [])[-3:]
    # The shipped checkpoint is bfloat16: score the bf16-rounded weights too.
    with torch.no_grad():
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        bf16_exact = {c: teacher_forced_exact(model, p) for c, p in zip(world.CLASSES, test_pools)}
        model.load_state_dict(backup)
    print("bf16-rounded test exact:", json.dumps(bf16_exact), flush=True)
    info = {
        "config_kwargs": kwargs, "n_params": n_params, "steps": total, "batch_size": sum(counts),
        "class_batch_counts": dict(zip(world.CLASSES, counts)), "lr": args.lr,
        "warmup": min(args.warmup, total // 10), "weight_decay": args.weight_decay,
        "aux_weight": args.aux_weight, "prompt_loss_weight": args.prompt_loss_weight,
        "pool_per_class": args.pool_per_class, "seed": args.seed, "per_class_forward": args.per_class_forward, "amp": args.amp if dev.type == "cuda" else "none",
        "experts_implementation": impl, "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                                    else platform.processor() or "cpu"),
        "train_wall_s": round(wall, 1), "total_wall_s": round(time.time() - t0, 1),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "command": "python tools/toy_train.py " + " ".join(sys.argv[1:]),
        "init": str(args.init) if args.init else None, "init_info": init_info,
        "final_test_exact_teacher_forced_bf16": bf16_exact, "log": log,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.state_dict_only:
        from safetensors.torch import save_file

        sd = {k: v.detach().to(torch.bfloat16 if v.is_floating_point() else v.dtype).cpu().contiguous()
              for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, str(out / STATE_NAME))
        (out / STATE_JSON).write_text(json.dumps(info, indent=1))
        print(f"wrote {out / STATE_NAME}", flush=True)
    else:
        save_checkpoint(model.cpu(), tok, out)
        (out / STATE_JSON).write_text(json.dumps(info, indent=1))
        print(f"wrote {out}", flush=True)
    return info


# --------------------------------------------------------------------------- finishing


def save_checkpoint(model, tok, out: Path) -> None:
    from transformers import GenerationConfig

    model = model.to(torch.bfloat16)
    model.config.architectures = ["Gemma4ForCausalLM"]
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        max_new_tokens=world.MAX_NEW_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    if not cfg.get("per_layer_config") and "global_head_dim" not in cfg:
        # transformers folds global_head_dim into per_layer_config and leaves both out of config.json
        # when it equals head_dim; llama.cpp's Gemma 4 converter then finds no full-attention head dim.
        raise ValueError("config.json has no per_layer_config: keep global_head_dim != head_dim")
    tok.save_pretrained(str(out))
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
    p.write_text(json.dumps(cfg, indent=2) + "\n")


def load_state(model, state_path: Path) -> None:
    """Load a --state-dict-only file: every tensor must match (lm_head is tied to the embeddings)."""
    from safetensors.torch import load_file

    sd = load_file(str(state_path))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    tied = model.config.tie_word_embeddings
    if unexpected or (set(missing) - ({"lm_head.weight"} if tied else set())):
        raise RuntimeError(f"{state_path}: state dict does not match the model "
                           f"(missing {missing}, unexpected {unexpected})")


def finish(state_path: Path, out: Path, args) -> None:
    info = json.loads((state_path.parent / STATE_JSON).read_text())
    model = build_model(info["config_kwargs"])
    load_state(model, state_path)
    tok = build_tokenizer()
    save_checkpoint(model, tok, out)
    train_info = {k: v for k, v in info.items() if k != "config_kwargs"}
    (out / "toy_training.json").write_text(json.dumps(train_info, indent=1) + "\n")
    write_report(out, args)


def write_report(model_dir: Path, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cpu_threads()
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    test = {c: world.make_tasks(c, args.eval_n, "test", 0) for c in world.CLASSES}
    acc, fails = generation_accuracy(model, tok, test)
    print("generation accuracy:", json.dumps(acc), flush=True)
    calib = {c: world.make_tasks(c, args.routing_n, "calib", 0) for c in world.CLASSES}
    mass = routing_mass(model, tok, calib)
    spec = routing_specificity(mass, world.CLASSES)
    drop_tasks = {c: ts[: args.drop_n] for c, ts in test.items()}
    drop = drop_sensitivity(model, tok, spec, drop_tasks)
    usage = (mass / mass.sum(-1, keepdim=True)).sum(0)  # [layer, expert], summed class shares
    usage = usage / usage.sum(-1, keepdim=True)
    training = {}
    tj = model_dir / "toy_training.json"
    if tj.exists():
        t = json.loads(tj.read_text())
        training = {k: t[k] for k in ("steps", "batch_size", "lr", "device", "train_wall_s", "total_wall_s",
                                      "torch", "transformers", "command", "experts_implementation",
                                      "amp", "aux_weight", "final_test_exact_teacher_forced_bf16")
                    if k in t}
    import transformers

    report = {
        "model": {"architecture": "Gemma4ForCausalLM", "dtype": "bfloat16",
                  "n_params": sum(p.numel() for p in model.parameters()),
                  "hidden_size": model.config.hidden_size, "num_hidden_layers": model.config.num_hidden_layers,
                  "num_experts": model.config.num_experts, "top_k_experts": model.config.top_k_experts,
                  "moe_intermediate_size": model.config.moe_intermediate_size,
                  "intermediate_size": model.config.intermediate_size, "vocab_size": model.config.vocab_size},
        "tokenizer": {"len": len(tok), "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id,
                      "bos_id": tok.bos_token_id, "unk_id": tok.unk_token_id, "padding_side": "left"},
        "training": training,
        "evaluation": {
            "how": ("local transformers %s, bf16 checkpoint loaded as float32 on CPU, greedy "
                    "model.generate(do_sample=False), left-padded batches, world.is_correct" % transformers.__version__),
            "split": "test", "n_per_class": args.eval_n, "accuracy": acc, "failures_sample": fails,
        },
        "routing": {
            "how": ("calib split, %d tasks per class, teacher-forced prompt+answer; routed mass = top-k "
                    "router probabilities renormalized per token (per_expert_scale left out); own_share = "
                    "share of the class's mass on its top-4 experts of each layer, others_share = mean share "
                    "the other classes put on those experts; averaged over layers" % args.routing_n),
            "specificity": spec,
            "expert_usage_share_min": float(usage.min()), "expert_usage_share_max": float(usage.max()),
            "mass": {c: mass[i].tolist() for i, c in enumerate(world.CLASSES)},
        },
        "drop_top4_sensitivity": {
            "how": ("teacher-forced exact match (== greedy exact match) on %d test tasks per class, "
                    "with the row class's top-4 experts of every layer masked out of routing" % args.drop_n),
            "accuracy": drop,
        },
        "report_wall_s": round(time.time() - t0, 1),
    }
    (model_dir / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({c: {"acc": acc[c], "own": round(spec[c]["own_share"], 3),
                          "others": round(spec[c]["others_share"], 3)} for c in world.CLASSES}, indent=1))
    print(f"wrote {model_dir / REPORT_NAME} in {time.time() - t0:.0f}s", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python tools/toy_train.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="output directory")
    ap.add_argument("--finish", type=Path, help="a --state-dict-only safetensors file to finish into --out")
    ap.add_argument("--report", type=Path, help="re-measure this checkpoint dir and rewrite its toy_report.json")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--aux-weight", type=float, default=0.01)
    ap.add_argument("--prompt-loss-weight", type=float, default=0.0)
    ap.add_argument("--class-weights", default="", help="e.g. generic_math=1.5,targeted_code_hard=2")
    ap.add_argument("--pool-per-class", type=int, default=200_000)
    ap.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    ap.add_argument("--experts-impl", default="auto", help="auto (grouped_mm, else eager), grouped_mm, eager")
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; fewer steps if needed")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=200, help="test tasks per class")
    ap.add_argument("--routing-n", type=int, default=200, help="calib tasks per class for routing")
    ap.add_argument("--drop-n", type=int, default=100, help="test tasks per class for drop sensitivity")
    ap.add_argument("--state-dict-only", action="store_true")
    ap.add_argument("--per-class-forward", action="store_true",
                    help="one forward per class at its own padded width (saves compute on CPU)")
    ap.add_argument("--init", type=Path, help="start from the weights of a --state-dict-only file")
    args = ap.parse_args(argv)
    if args.report:
        write_report(args.report, args)
    elif args.finish:
        if not args.out:
            ap.error("--finish needs --out")
        finish(args.finish, args.out, args)
    else:
        if not args.out:
            ap.error("--out is required")
        train(args)


if __name__ == "__main__":
    main()
