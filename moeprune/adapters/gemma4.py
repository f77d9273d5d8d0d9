"""Gemma 4 (e.g. gemma-4-26B-A4B): fused experts beside an always-on dense FFN.

Router: `proj.weight [E, H]` and `per_expert_scale [E]`; softmax over all experts, top-k,
renormalize, multiply by per_expert_scale. Experts: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`.
The dense `mlp` runs in parallel with the experts: it is the "shared FFN" that the coder recipes
upweight. Multimodal checkpoints nest the text model under `model.language_model.` and its config
under `text_config`; the vision tower is left untouched.
"""

import torch
from torch import nn

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MoEAdapter, MoEBlock


class Gemma4Adapter(MoEAdapter):
    def _text_model(self, model: nn.Module) -> nn.Module:
        inner = model.model
        return getattr(inner, "language_model", inner)

    def moe_blocks(self, model):
        blocks = []
        for i, layer in enumerate(self._text_model(model).layers):
            if getattr(layer, "enable_moe_block", False):
                blocks.append(MoEBlock(i, layer.router, layer.experts))
        return blocks

    def expert_output(self, experts, expert, x):
        gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])

    def router_logits_module(self, block):
        return block.router.proj


ADAPTERS.register("gemma4")(
    Gemma4Adapter(
        name="gemma4",
        model_types=("gemma4", "gemma4_text"),
        expert_axis_tensors={
            "experts.gate_up_proj": 0,
            "experts.down_proj": 0,
            "router.proj.weight": 0,
            "router.per_expert_scale": 0,
        },
        shared_down_tensors=("mlp.down_proj.weight",),
        num_experts_key="num_experts",
        top_k_key="top_k_experts",
        text_config_key="text_config",
    )
)
