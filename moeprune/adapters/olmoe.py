"""OLMoE (e.g. OLMoE-1B-7B): routed experts only in every layer, no shared FFN.

Router `mlp.gate.weight [E, H]`: softmax, top-k, renormalized only when `norm_topk_prob` (off in the
released models, so the kept weights are softmax probabilities over all experts: the virtual prune
masks logits before that softmax, which is exactly the pruned model's smaller softmax). Experts are
one tensor per expert on the Hub (`mlp.experts.N.{gate,up,down}_proj.weight`), fused in memory.
"""

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MLP_EXPERT_TENSORS, MLP_PER_EXPERT, MoEAdapter

ADAPTERS.register("olmoe")(
    MoEAdapter(
        name="olmoe",
        model_types=("olmoe",),
        expert_axis_tensors=MLP_EXPERT_TENSORS,
        per_expert_pattern=MLP_PER_EXPERT,
        num_experts_key="num_experts",
        extra_expert_count_keys=("num_local_experts",),
        notes="no shared FFN: shared_ffn_alpha must stay 1.0",
    )
)
