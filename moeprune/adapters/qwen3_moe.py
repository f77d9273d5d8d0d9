"""Qwen3-MoE (e.g. Qwen3-30B-A3B, Qwen3-235B-A22B): routed experts only, no shared FFN.

Router `mlp.gate.weight [E, H]`: softmax over all experts, top-k, renormalized when
`norm_topk_prob`. On the Hub and from transformers 5 `save_pretrained` the experts are one tensor
per expert (`mlp.experts.N.{gate,up,down}_proj.weight`); in memory, and in checkpoints saved from a
state dict, they are fused (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj`).
Layers listed in `mlp_only_layers` (or off `decoder_sparse_step`) are dense and left alone.
"""

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MLP_EXPERT_TENSORS, MLP_PER_EXPERT, MoEAdapter

ADAPTERS.register("qwen3_moe")(
    MoEAdapter(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        expert_axis_tensors=MLP_EXPERT_TENSORS,
        per_expert_pattern=MLP_PER_EXPERT,
        num_experts_key="num_experts",
        extra_expert_count_keys=("num_local_experts",),
        notes="no shared FFN: shared_ffn_alpha must stay 1.0",
    )
)
