"""Mixtral (8x7B, 8x22B): routed experts only, no shared FFN.

Router `gate.weight [E, H]`: softmax, top-k, always renormalized. Hub checkpoints and transformers 5
`save_pretrained` name the block `block_sparse_moe` with one tensor per expert (`experts.N.w1/w2/w3`:
gate, down, up); transformers renames it to `mlp` and fuses the experts at load, so a checkpoint
saved from a state dict has `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` instead.
"""

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MLP_EXPERT_TENSORS, MoEAdapter

ADAPTERS.register("mixtral")(
    MoEAdapter(
        name="mixtral",
        model_types=("mixtral",),
        expert_axis_tensors={**MLP_EXPERT_TENSORS, "block_sparse_moe.gate.weight": 0},  # Hub: block_sparse_moe
        per_expert_pattern=r"(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\..+",
        num_experts_key="num_local_experts",
        extra_expert_count_keys=("num_experts",),
        notes="no shared FFN: shared_ffn_alpha must stay 1.0",
    )
)
