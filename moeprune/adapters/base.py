"""What an adapter knows about one MoE architecture family, mostly as data.

Checkpoint tensors are described by names relative to a decoder layer (`model.layers.N.` or, for
multimodal wrappers, `model.language_model.layers.N.`): which ones carry an expert axis (fused 3-D
expert weights, router rows, per-expert scales or biases), which are one tensor per expert, and
which is the shared/dense FFN's down projection. Code hooks exist only where routing math differs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from moeprune.errors import MoePruneError

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<rest>.+)$")


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
    extra_expert_count_keys: tuple[str, ...] = ()  # other config keys equal to the expert count
    text_config_key: str | None = None  # multimodal wrappers nest the text model's config
    notes: str = ""

    # ---- config ---------------------------------------------------------------------------
    def text_config(self, config_dict: dict) -> dict:
        """The dict holding the MoE keys (the nested text config for multimodal checkpoints)."""
        if self.text_config_key and self.text_config_key in config_dict:
            return config_dict[self.text_config_key]
        return config_dict

    def num_experts(self, config_dict: dict) -> int:
        tc = self.text_config(config_dict)
        if tc.get(self.num_experts_key) is None:
            raise MoePruneError(f"config has no {self.num_experts_key!r}: not a {self.name} MoE model")
        return int(tc[self.num_experts_key])

    def top_k(self, config_dict: dict) -> int:
        return int(self.text_config(config_dict)[self.top_k_key])

    def with_num_experts(self, config_dict: dict, n: int) -> dict:
        """A copy of the config with the expert count set to n (everywhere it is recorded)."""
        import copy

        out = copy.deepcopy(config_dict)
        tc = self.text_config(out)
        for key in (self.num_experts_key, *self.extra_expert_count_keys):
            if key in tc:
                tc[key] = n
        return out

    def validate_keep(self, config_dict: dict, keep: int) -> None:
        """Refuse keep counts the architecture cannot run with."""
        e, k = self.num_experts(config_dict), self.top_k(config_dict)
        if not k <= keep <= e:
            raise MoePruneError(
                f"cannot keep {keep} experts per layer: expected top_k ({k}) <= keep <= num_experts ({e})"
            )

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
    def moe_blocks(self, model: nn.Module) -> list[MoEBlock]:
        raise NotImplementedError

    def expert_output(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The un-gated output of one expert on tokens x [T, H] (used by the profiler)."""
        raise NotImplementedError

    def router_logits_module(self, block: MoEBlock) -> nn.Module:
        """The module whose output is the [tokens, num_experts] router logits (virtual pruning)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def virtual_prune(self, model: nn.Module, drop_map: dict[int, list[int]]) -> Iterator[None]:
        """Route as the pruned model would: dropped experts' logits are -inf before the softmax.

        Softmax-then-top-k-then-renormalize over all experts with the dropped ones at -inf selects
        the same experts with the same weights as the same routing over the kept experts alone.
        """
        handles = []
        for block in self.moe_blocks(model):
            dropped = drop_map.get(block.layer, [])
            if not dropped:
                continue
            module = self.router_logits_module(block)
            mask = None

            def hook(_m, _inp, out, dropped=dropped):
                nonlocal mask
                if mask is None or mask.device != out.device or mask.dtype != out.dtype:
                    mask = torch.zeros(out.shape[-1], dtype=out.dtype, device=out.device)
                    mask[dropped] = float("-inf")
                return out + mask

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
