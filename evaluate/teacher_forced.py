"""The objective without generation: divergence of a (virtually) pruned model from the base model,
teacher-forced on the base model's own greedy continuations of held-out prompts.

`build_reference` runs once per (model, bench) and is cached as the `reference` stage's artifact:
each prompt's token ids, the base model's greedy continuation (up to and including its EOS), and
at every continuation position the base's top `bench.top_logprobs` log-probabilities with their
token ids and the log of the probability left outside them. `score` teacher-forces a model on
those sequences and compares, position by position:

- kl: KL(base || model) over the kept entries plus one bucket for the rest. That is the KL of the
  two distributions coarsened to K + 1 outcomes: a lower bound of the full KL, exact when K covers
  the vocabulary (the toy model's 384 tokens), and what keeps memory bounded at 262,144 tokens:
  no full-vocabulary distribution is stored, only one batch's is held while it is reduced;
- nll: -log p_model(the base's token);
- agreement: whether the model's argmax is the base's token.
Each class's figure is the mean over its continuation tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune import artifacts
from moeprune.errors import MoePruneError
from moeprune.evaluate.benches.divergence import METRICS

REFERENCE_FILE, REFERENCE_META = "reference.safetensors", "reference.json"
LOWER_IS_BETTER = {"kl": True, "nll": True, "agreement": False}


def build_reference(bench, backend, out_dir: Path, exclude: set[str] = frozenset()) -> dict:
    """The base side, computed once: continuations and the base's top-K log-probs at each position."""
    samples = [s for s in bench.samples() if s.prompt not in exclude]
    left_out = len(bench.samples()) - len(samples)
    if not samples:
        raise MoePruneError(f"bench {bench.name}: every held-out prompt also occurs in the calibration corpus: "
                            "expected prompts the profile did not use")
    prompts = [bench.encode(backend.tokenizer, s, backend.enable_thinking) for s in samples]
    continuations = backend.greedy_ids(prompts, bench.max_new_tokens)
    empty = [s.id for s, c in zip(samples, continuations) if not c]
    if empty:
        raise MoePruneError(f"bench {bench.name}: the base model continued {empty[:3]} with no token: expected "
                            "bench.max_new_tokens >= 1")

    def top(rows, logprobs, mask, targets):
        k = min(bench.top_logprobs, logprobs.shape[-1])
        values, ids = logprobs.topk(k, dim=-1)
        tail = torch.log1p(-values.exp().sum(-1).clamp(max=1.0 - 1e-7))  # log P(outside the kept entries)
        return [(ids[r][mask[r]].to(torch.int32).cpu(), values[r][mask[r]].cpu(), tail[r][mask[r]].cpu())
                for r in range(len(rows))]

    tops = backend.teacher_forced(prompts, continuations, top)
    tensors = {}
    for i, (p, c, (ids, values, tail)) in enumerate(zip(prompts, continuations, tops)):
        tensors.update({f"{i}.prompt": torch.tensor(p, dtype=torch.int32),
                        f"{i}.continuation": torch.tensor(c, dtype=torch.int32), f"{i}.top_ids": ids.contiguous(),
                        f"{i}.top_logprobs": values.contiguous(), f"{i}.tail_logprob": tail.contiguous()})
    save_file(tensors, str(out_dir / REFERENCE_FILE))
    meta = {"bench": bench.name, "samples": [{"id": s.id, "category": s.category} for s in samples],
            "top_logprobs": int(tops[0][0].shape[-1]), "left_out_in_calibration": left_out,
            "continuation_tokens": sum(len(c) for c in continuations),
            "stopped": sum(1 for c in continuations if len(c) < bench.max_new_tokens), "data_hash": bench.data_hash}
    artifacts.write_json(out_dir / REFERENCE_META, meta)
    return {"samples": len(samples), "continuation_tokens": meta["continuation_tokens"],
            "left_out_in_calibration": left_out}


def load_reference(ref_dir: Path) -> tuple[dict, list[dict]]:
    meta = artifacts.read_json(ref_dir / REFERENCE_META)
    t = load_file(str(ref_dir / REFERENCE_FILE))
    rows = [{"prompt": t[f"{i}.prompt"].tolist(), "continuation": t[f"{i}.continuation"].tolist(),
             "top_ids": t[f"{i}.top_ids"].long(), "top_logprobs": t[f"{i}.top_logprobs"],
             "tail_logprob": t[f"{i}.tail_logprob"]} for i in range(len(meta["samples"]))]
    return meta, rows


def score(bench, backend, ref_dir: Path) -> tuple[dict, list[dict]]:
    """(summary, per-sample rows) of the backend's model against the cached base side."""
    meta, ref = load_reference(ref_dir)
    device = backend.model.device

    def compare(rows, logprobs, mask, targets):
        width = logprobs.shape[1]
        out = []
        for r, i in enumerate(rows):
            n = len(ref[i]["continuation"])
            q = logprobs[r, width - n:]  # this row's continuation positions (left-padded batch)
            ids, p_log = ref[i]["top_ids"].to(device), ref[i]["top_logprobs"].to(device)
            p_tail_log = ref[i]["tail_logprob"].to(device)
            q_top = q.gather(-1, ids)
            q_tail_log = torch.log1p(-q_top.exp().sum(-1).clamp(max=1.0 - 1e-7))
            kl = (p_log.exp() * (p_log - q_top)).sum(-1) + p_tail_log.exp() * (p_tail_log - q_tail_log)
            tgt = targets[r, width - n:]
            nll = -q.gather(-1, tgt[:, None])[:, 0]
            agree = (q.argmax(-1) == tgt).float()
            out.append({"kl": kl.clamp(min=0).sum().item(), "nll": nll.sum().item(), "agreement": agree.sum().item(),
                        "tokens": n})
        return out

    sums = backend.teacher_forced([r["prompt"] for r in ref], [r["continuation"] for r in ref], compare)
    rows = [{"id": s["id"], "category": s["category"], "tokens": v["tokens"],
             **{m: v[m] / v["tokens"] for m in METRICS}} for s, v in zip(meta["samples"], sums)]
    return summarize(bench, meta, rows, sums, backend.identity()), rows


def summarize(bench, meta: dict, rows: list[dict], sums: list[dict], identity: dict) -> dict:
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r, v in zip(rows, sums):
        by_cat[r["category"]].append(v)
    metrics = {}
    for m in METRICS:  # token-weighted mean per class; the macro mean over classes
        per = {c: sum(v[m] for v in vs) / sum(v["tokens"] for v in vs) for c, vs in sorted(by_cat.items())}
        metrics[m] = {"score": sum(per.values()) / len(per), "per_category": per}
    chosen = metrics[bench.metric]
    per_sample = [r[bench.metric] for r in rows]
    mean = sum(per_sample) / len(per_sample)
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_sample) / max(1, len(per_sample) - 1))
    from moeprune.evaluate.bench_run import others_mean

    return {
        "bench": bench.name, "n": len(rows), "metric": bench.metric, "lower_is_better": LOWER_IS_BETTER[bench.metric],
        "score": chosen["score"], "stderr": sd / math.sqrt(len(per_sample)),
        "per_category": chosen["per_category"],
        "per_category_n": {c: len(vs) for c, vs in sorted(by_cat.items())},
        "others_mean": others_mean(chosen["per_category"]),
        "metrics": metrics, "tokens": sum(r["tokens"] for r in rows), "empty_rate": 0.0, "flags": [],
        "model": identity, "data_hash": meta["data_hash"],
        "reference": {"top_logprobs": meta["top_logprobs"], "left_out_in_calibration": meta["left_out_in_calibration"]},
        "settings": {"bench": bench.settings()},
    }
