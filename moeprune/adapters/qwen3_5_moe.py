"""Qwen3.5 / Qwen3.6 MoE and Qwen3-Next: routed experts plus one gated shared expert.

Router `mlp.gate.weight [E, H]`: softmax, top-k, renormalized (Qwen3-Next: when `norm_topk_prob`).
The shared expert (`mlp.shared_expert.*`, scaled by `sigmoid(mlp.shared_expert_gate(x))`) runs on
every token: it is the shared FFN whose down projection the α upweight scales. Released Qwen3.5
checkpoints are multimodal (`model.language_model.layers.N.`, config under `text_config`, vision
tower `model.visual.*` left untouched); experts are one tensor per expert there and in transformers
5 `save_pretrained` output, fused in memory.
"""

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MLP_EXPERT_TENSORS, MLP_PER_EXPERT, MoEAdapter

ADAPTERS.register("qwen3_5_moe")(
    MoEAdapter(
        name="qwen3_5_moe",
        model_types=("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"),
        expert_axis_tensors=MLP_EXPERT_TENSORS,
        per_expert_pattern=MLP_PER_EXPERT,
        shared_down_tensors=("mlp.shared_expert.down_proj.weight",),
        num_experts_key="num_experts",
        extra_expert_count_keys=("num_local_experts",),
        text_config_key="text_config",
        mtp_prefixes=("mtp.",),
        mtp_config_keys=("mtp_num_hidden_layers",),
        notes="shared FFN = `mlp.shared_expert` (its sigmoid gate is untouched)",
    )
)
