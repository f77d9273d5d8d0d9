"""Gemma 4 (e.g. gemma-4-26B-A4B): fused experts beside an always-on dense FFN.

Router: `proj.weight [E, H]` and `per_expert_scale [E]`; softmax over all experts, top-k,
renormalize, multiply by per_expert_scale. Experts: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`,
stored fused on the Hub and by `save_pretrained`. The dense `mlp` runs in parallel with the
experts: it is the "shared FFN" that the coder recipes upweight. Multimodal checkpoints nest the
text model under `model.language_model.` and its config under `text_config`; the vision tower is
left untouched.
"""

import contextlib

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MoEAdapter, minus_inf_at


class Gemma4Adapter(MoEAdapter):
    @contextlib.contextmanager
    def mask_experts(self, block, dropped):
        # The logits come from a Linear submodule (`router.proj`), so -inf can be added to its
        # output before the router's own softmax -> top-k -> renormalize -> per_expert_scale.
        handle = block.router.proj.register_forward_hook(lambda _m, _a, out: out + minus_inf_at(dropped, out))
        try:
            yield
        finally:
            handle.remove()


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
        block_attr="",
        router_attr="router",
        notes="dense `mlp` = shared FFN; router `proj` rows and `per_expert_scale` follow the experts",
    )
)
