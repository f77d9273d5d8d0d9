"""What an adapter knows about one MoE architecture family, mostly as data.

Checkpoint tensors are described by names relative to a decoder layer (`model.layers.N.` or, for
multimodal wrappers, `model.language_model.layers.N.`): which ones carry an expert axis (fused 3-D
expert weights, router rows, per-expert scales or biases), which are one tensor per expert, and
which is the shared/dense FFN's down projection. Code hooks exist only where routing math differs.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.dropmap import DropMap

# Decoder layers of the text model only: `model.layers.N.` or, in multimodal wrappers,
# `model.language_model.layers.N.`. Vision towers (`model.vision_tower.encoder.layers.N.`,
# `model.visual.blocks.N.`) never match, so surgery copies them untouched.
LAYER_RE = re.compile(r"^(?P<prefix>model\.(?:language_model\.)?layers\.)(?P<layer>\d+)\.(?P<rest>.+)$")

# The layout transformers gives the `mlp`-block families (Qwen3-MoE, Qwen3.5/Next, OLMoE,
# DeepSeek-V3, Mixtral once renamed): fused experts in memory and in state-dict checkpoints, one
# tensor per expert on the Hub, the router at `mlp.gate`.
MLP_EXPERT_TENSORS = {"mlp.experts.gate_up_proj": 0, "mlp.experts.down_proj": 0, "mlp.gate.weight": 0}
MLP_PER_EXPERT = r"mlp\.experts\.(?P<expert>\d+)\..+"


@dataclass(frozen=True)
class TensorRole:
    """How surgery treats one checkpoint tensor."""

    kind: str  # "expert_axis" (slice `axis` by kept ids), "per_expert" (keep/renumber), "shared_down", "other"
    layer: int | None = None
    axis: int = 0
    expert: int | None = None
    rename: str | None = None  # per_expert: the name with `{expert}` where the id goes


@dataclass(frozen=True)
class MoEBlock:
    """One MoE layer of a loaded model."""

    layer: int
    router: nn.Module
    experts: nn.Module


@dataclass(frozen=True)
class MoEAdapter:
    name: str
    model_types: tuple[str, ...]
    # checkpoint names relative to the layer prefix -> expert axis
    expert_axis_tensors: dict[str, int]
    # regex over the layer-relative name for one-tensor-per-expert layouts (named group `expert`)
    per_expert_pattern: str | None = None
    shared_down_tensors: tuple[str, ...] = ()
    num_experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    # other config keys equal to the expert count (transformers' attribute_map aliases: a Hub
    # Qwen3-MoE config says `num_experts`, the same config saved by transformers 5 `num_local_experts`)
    extra_expert_count_keys: tuple[str, ...] = ()
    text_config_key: str | None = None  # multimodal wrappers nest the text model's config
    # multi-token-prediction heads outside the decoder stack (beyond layers past num_hidden_layers):
    # their tensor name prefixes and the config keys that count them (zeroed when they are dropped)
    mtp_prefixes: tuple[str, ...] = ()
    mtp_config_keys: tuple[str, ...] = ()
    # where a loaded decoder layer keeps its MoE block, and the block its router and experts
    # ("" = the decoder layer itself, as in Gemma 4)
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    notes: str = ""

    # ---- config ---------------------------------------------------------------------------
    def text_config(self, config_dict: dict) -> dict:
        """The dict holding the MoE keys (the nested text config for multimodal checkpoints)."""
        if self.text_config_key and self.text_config_key in config_dict:
            return config_dict[self.text_config_key]
        return config_dict

    def num_experts(self, config_dict: dict) -> int:
        tc = self.text_config(config_dict)
        for key in (self.num_experts_key, *self.extra_expert_count_keys):
            if tc.get(key) is not None:
                return int(tc[key])
        keys = " / ".join(repr(k) for k in (self.num_experts_key, *self.extra_expert_count_keys))
        raise MoePruneError(f"config has no expert count ({keys}): not a {self.name} MoE model")

    def top_k(self, config_dict: dict) -> int:
        tc = self.text_config(config_dict)
        if tc.get(self.top_k_key) is None:
            raise MoePruneError(f"config has no {self.top_k_key!r}: not a {self.name} MoE model")
        return int(tc[self.top_k_key])

    def with_num_experts(self, config_dict: dict, n: int) -> dict:
        """A copy of the config with the expert count set to n (everywhere it is recorded)."""
        out = copy.deepcopy(config_dict)
        tc = self.text_config(out)
        for key in (self.num_experts_key, *self.extra_expert_count_keys):
            if key in tc:
                tc[key] = n
        return out

    def pruned_config(self, config_dict: dict, drop_map: dict[int, list[int]]) -> dict:
        """The config of the checkpoint that `drop_map` (already validated) produces."""
        sizes = {len(d) for d in drop_map.values()} or {0}
        return self.with_num_experts(config_dict, self.num_experts(config_dict) - sizes.pop())

    def expert_groups(self, config_dict: dict, keep: int) -> tuple[int, list[tuple[int, int]]] | None:
        """For group-limited routing: (n_group, the legal (groups kept, experts kept per group) shapes
        for `keep` experts per layer), so the drop map can be chosen legal; None when routing is not
        grouped."""
        return None

    def validate_keep(self, config_dict: dict, keep: int) -> None:
        """Refuse keep counts the architecture cannot run with."""
        e, k = self.num_experts(config_dict), self.top_k(config_dict)
        if not k <= keep <= e:
            raise MoePruneError(
                f"cannot keep {keep} experts per layer: expected top_k ({k}) <= keep <= num_experts ({e})"
            )

    def check_routing_rules(self, config_dict: dict, drop_map: dict[int, list[int]], physical: bool) -> None:
        """Refuse drop maps this architecture's routing cannot run with, beyond what every map is
        checked for (moeprune.dropmap.DropMap.parse); `physical`: for a checkpoint."""

    # ---- checkpoint tensors -----------------------------------------------------------------
    def role(self, tensor_name: str) -> TensorRole:
        m = LAYER_RE.match(tensor_name)
        if not m:
            return TensorRole("other")
        layer, rest = int(m["layer"]), m["rest"]
        if rest in self.expert_axis_tensors:
            return TensorRole("expert_axis", layer, axis=self.expert_axis_tensors[rest])
        if self.per_expert_pattern:
            pm = re.fullmatch(self.per_expert_pattern, rest)
            if pm:
                s, e = pm.span("expert")
                rename = m["prefix"] + m["layer"] + "." + rest[:s] + "{expert}" + rest[e:]
                return TensorRole("per_expert", layer, expert=int(pm["expert"]), rename=rename)
        if rest in self.shared_down_tensors:
            return TensorRole("shared_down", layer)
        return TensorRole("other", layer)

    # ---- loaded models ----------------------------------------------------------------------
    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (`...Model` with `.layers`) of a causal LM or a multimodal wrapper."""
        inner = getattr(model, "model", model)
        return getattr(inner, "language_model", inner)

    def moe_blocks(self, model: nn.Module) -> list[MoEBlock]:
        """The MoE layers, in order; dense layers (no experts module) are skipped."""
        blocks = []
        for i, layer in enumerate(self.text_model(model).layers):
            block = getattr(layer, self.block_attr, None) if self.block_attr else layer
            experts = getattr(block, self.experts_attr, None)
            if experts is not None:
                blocks.append(MoEBlock(i, getattr(block, self.router_attr), experts))
        return blocks

    def expert_output(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The un-gated output of one expert on tokens x [T, H] (used by the profiler).

        Default: transformers' fused SwiGLU layout, `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`.
        """
        gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])

    # ---- profiling (owned by the profiling issue) ----------------------------------------------
    def grouped_expert_outputs(self, experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor):
        """Every routed (token, slot)'s un-gated expert output, computed as transformers' `grouped_mm`
        experts implementation computes it (same sort, same helpers, same order of operations), so
        that gating and summing the rows reproduces that implementation's output exactly.

        Returns (out [S, H] sorted by expert, act [S, I] the intermediate activations, expert ids
        [S] sorted, perm [S]): sorted row r is the flattened (token, slot) perm[r], token perm[r] // k.
        Covers every `@use_experts_implementation` class (fused gate_up or up only, transposed or
        not, biases, a custom `_apply_gate`, a post-expert norm); override it only for a layout
        transformers does not fuse.
        """
        from transformers.integrations.moe import _grouped_linear

        if getattr(experts, "_is_expert_parallel", False):
            raise MoePruneError("profiling an expert-parallel model is not supported: load it on one device "
                                "or use profile.mode=layerwise")
        n = experts.num_experts
        ids_g, perm = torch.sort(top_k_index.reshape(-1))
        x_g = hidden_states[perm // top_k_index.size(-1)]
        # histc as transformers does it: CPU/MPS histc takes floats only, deterministic CUDA ints only
        hist_in = ids_g.float() if hidden_states.device.type in ("cpu", "mps") else ids_g.int()
        offsets = torch.cumsum(torch.histc(hist_in, bins=n, min=0, max=n - 1), dim=0, dtype=torch.int32)
        gated, biased, tr = experts.has_gate, experts.has_bias, experts.is_transposed
        w_up = experts.gate_up_proj if gated else experts.up_proj
        b_up = (experts.gate_up_proj_bias if gated else experts.up_proj_bias)[ids_g] if biased else None
        act = _grouped_linear(x_g, w_up, offsets, bias=b_up, is_transposed=tr)
        act = experts._apply_gate(act) if gated else experts.act_fn(act)
        b_down = experts.down_proj_bias[ids_g] if biased else None
        out = _grouped_linear(act, experts.down_proj, offsets, bias=b_down, is_transposed=tr)
        if getattr(experts, "has_post_expert_norm", False):
            out = experts.post_expert_norm(out)
        return out, act, ids_g, perm

    # ---- virtual pruning ----------------------------------------------------------------------
    @contextlib.contextmanager
    def virtual_prune(self, model: nn.Module, drop_map) -> Iterator[None]:
        """Route the loaded model exactly as the pruned checkpoint would, without writing weights.

        `drop_map` is a DropMap, or a plain {layer: [ids]} checked here as one (the kept count may
        differ per layer). Each adapter's `mask_experts` makes dropped experts unselectable in a way that
        is exact for its routing math; tests hold every adapter equal to its physical prune.
        """
        if not isinstance(drop_map, DropMap):
            drop_map = DropMap.for_model(drop_map, self, model.config.to_dict(), physical=False)
        blocks = {b.layer: b for b in self.moe_blocks(model)}
        unknown = sorted(set(drop_map) - set(blocks))
        if unknown:
            raise MoePruneError(f"drop map names layers {unknown} that are not MoE layers: expected some of {sorted(blocks)}")
        with contextlib.ExitStack() as stack:
            for layer, dropped in drop_map.items():
                if dropped:
                    stack.enter_context(self.mask_experts(blocks[layer], dropped))
            yield

    @contextlib.contextmanager
    def upweight_shared_ffn(self, model: nn.Module, alpha: float,
                            stored: dict[str, torch.dtype] | None = None) -> Iterator[None]:
        """Scale the loaded model's shared-FFN down projections by `alpha` as surgery writes them
        (in float32, rounded to the checkpoint's dtype: `stored`, by tensor name, else the
        parameter's own), and put the exact original weights back on exit, so a virtual trial can
        vary prune.shared_ffn_alpha without writing a checkpoint."""
        if alpha == 1.0:
            yield
            return
        num_layers = self.text_config(model.config.to_dict()).get("num_hidden_layers")
        stored = stored or {}
        params = [(p, stored.get(name, p.dtype)) for name, p in model.named_parameters()
                  if (role := self.role(name)).kind == "shared_down"
                  and (num_layers is None or role.layer < num_layers) and p.dtype.is_floating_point
                  and p.element_size() > 1]  # 8-bit floats: surgery scales their block scales instead
        if not params:
            raise MoePruneError(f"prune.shared_ffn_alpha={alpha}, but the loaded {self.name} model has no shared FFN "
                                f"down projection in 16 or 32 bits to scale: expected 1.0")
        saved = [p.detach().clone() for p, _ in params]
        try:
            with torch.no_grad():
                for p, dtype in params:
                    p.copy_((p.float() * alpha).to(dtype))
            yield
        finally:
            with torch.no_grad():
                for (p, _), original in zip(params, saved):
                    p.copy_(original)

    @contextlib.contextmanager
    def mask_experts(self, block: MoEBlock, dropped: list[int]) -> Iterator[None]:
        """Default, for routers that return (logits, weights, indices) from softmax -> top-k
        [-> renormalize] (Qwen3-MoE, Mixtral, OLMoE, Qwen3.5/Next): the router's logits come from
        an inline `F.linear`, so a hook on the router recomputes weights and indices from the
        logits with the dropped experts at -inf (`route`). A softmax over all experts with the
        dropped ones at -inf equals the softmax over the kept experts alone, with or without the
        top-k renormalization, so the pruned model's routing is reproduced exactly.
        """
        def hook(router, _args, out):
            logits, weights, _ = out
            masked = logits + minus_inf_at(dropped, logits)
            new_weights, indices = self.route(router, masked)
            return masked, new_weights.to(weights.dtype), indices

        handle = block.router.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def route(self, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax -> top-k -> optional renormalization, as transformers' softmax top-k routers do."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):  # Mixtral and Qwen3.5 always renormalize: no flag
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices


def minus_inf_at(dropped: list[int], like: torch.Tensor) -> torch.Tensor:
    """A [E] vector: 0, and -inf at the dropped experts, in `like`'s dtype and device."""
    mask = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    mask[dropped] = float("-inf")
    return mask


@contextlib.contextmanager
def minus_inf_bias(bias: torch.Tensor, dropped: list[int]) -> Iterator[None]:
    """Set an additive per-expert routing bias to -inf at the dropped experts, restoring it after.

    For routers that add a bias to the scores they select on (gpt-oss's logit bias, DeepSeek-V3's
    `e_score_correction_bias`), -inf there makes a dropped expert unselectable while every kept
    expert's score and weight is computed exactly as before.
    """
    with torch.no_grad():
        saved = bias[dropped].clone()
        bias[dropped] = float("-inf")
    try:
        yield
    finally:
        with torch.no_grad():
            bias[dropped] = saved
