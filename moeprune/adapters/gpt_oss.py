"""gpt-oss (20b, 120b): fused, transposed experts with biases; a router with a bias.

Router `mlp.router.weight [E, H]` + `mlp.router.bias [E]`: top-k on the logits, then softmax over
the k chosen logits. Experts: `gate_up_proj [E, H, 2I]` (gate and up interleaved), `down_proj
[E, I, H]`, each with a per-expert bias; released checkpoints store the weights MXFP4-quantized as
`*_blocks` / `*_scales` with the same leading expert axis, so surgery slices those too. No shared
FFN. Virtual pruning sets the router bias to -inf at dropped experts: their logits are -inf, top-k
never picks them, and the softmax over the k chosen logits is unchanged.
"""

import contextlib

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MoEAdapter, minus_inf_bias


class GptOssAdapter(MoEAdapter):
    def expert_output(self, experts, expert, x):
        gate_up = x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
        return experts._apply_gate(gate_up) @ experts.down_proj[expert] + experts.down_proj_bias[expert]

    @contextlib.contextmanager
    def mask_experts(self, block, dropped):
        with minus_inf_bias(block.router.bias, dropped):
            yield


_EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias",
                   "gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")

ADAPTERS.register("gpt_oss")(
    GptOssAdapter(
        name="gpt_oss",
        model_types=("gpt_oss",),
        expert_axis_tensors={
            **{f"mlp.experts.{t}": 0 for t in _EXPERT_TENSORS},
            "mlp.router.weight": 0,
            "mlp.router.bias": 0,
        },
        num_experts_key="num_local_experts",
        extra_expert_count_keys=("num_experts",),
        router_attr="router",
        notes="no shared FFN: shared_ffn_alpha must stay 1.0",
    )
)
