"""DeepSeek-V3 / R1 style: sigmoid routing with a selection bias, group-limited, plus shared experts.

Router `mlp.gate.weight [E, H]` and `mlp.gate.e_score_correction_bias [E]`. Scores are
sigmoid(logits); selection uses scores + bias: the E experts form `n_group` groups of E/n_group
consecutive ids, each group is scored by the sum of its two best, the `topk_group` best groups
survive, and the top-k experts among them are chosen. Weights are the chosen sigmoid scores
(renormalized when `norm_topk_prob`) times `routed_scaling_factor`. The first
`first_k_dense_replace` layers are dense. `mlp.shared_experts` runs on every token: it is the shared
FFN the α upweight scales.

Which prunes are legal. The pruned model regroups its E' experts into n_group' groups of E'/n_group'
consecutive ids, so routing is unchanged only if every original group keeps either none of its
experts or the same number c of them (the same c in every group and every layer). Hence:
  - drop the same number of experts from every group (c = E/n_group - dropped per group), or
  - drop whole groups (n_group' = groups left, written to the config), or both;
  - c >= 2 (a group is scored by its two best experts), groups left >= topk_group, and
    topk_group * c >= top_k (enough candidates in the surviving groups).
Anything else is refused, for physical and virtual pruning alike (a virtual prune that no
checkpoint can reproduce would score a model nobody can ship). `expert_groups` lists the legal
shapes so that the drop map stage chooses a legal map for any strategy (prune/selection.py, select_grouped).

Virtual pruning sets `e_score_correction_bias` to -inf at dropped experts: their selection score is
-inf, so they never count toward a group's score nor get chosen, while the kept experts' scores and
weights are computed exactly as before.
"""

import contextlib

from moeprune.adapters import ADAPTERS
from moeprune.adapters.base import MLP_EXPERT_TENSORS, MLP_PER_EXPERT, MoEAdapter, minus_inf_bias
from moeprune.errors import MoePruneError


class DeepseekV3Adapter(MoEAdapter):
    def _groups(self, config_dict: dict) -> tuple[int, int]:
        tc = self.text_config(config_dict)
        return int(tc.get("n_group") or 1), int(tc.get("topk_group") or 1)

    def _legal(self, config_dict: dict, per_group_kept: list[int]) -> str | None:
        """Why a layer keeping `per_group_kept[g]` experts of group g is illegal, or None."""
        n_group, topk_group = self._groups(config_dict)
        kept = sorted({c for c in per_group_kept if c})
        if len(kept) != 1:
            return f"groups keep {per_group_kept} experts: expected the same count in every group that keeps any"
        c, groups_left = kept[0], sum(1 for x in per_group_kept if x)
        if c < 2:
            return f"groups keep {c} expert each: expected at least 2 (a group is scored by its two best experts)"
        if groups_left < topk_group:
            return f"{groups_left} groups keep experts: expected at least topk_group ({topk_group})"
        if topk_group * c < self.top_k(config_dict):
            return f"topk_group ({topk_group}) x {c} kept per group < top_k ({self.top_k(config_dict)})"
        return None

    def expert_groups(self, config_dict, keep):
        e, (n_group, _) = self.num_experts(config_dict), self._groups(config_dict)
        if n_group <= 1:
            return None
        size = e // n_group
        return n_group, [(g, keep // g) for g in range(1, n_group + 1)
                         if keep % g == 0 and keep // g <= size and self._legal(config_dict, [keep // g] * g) is None]

    def validate_keep(self, config_dict, keep):
        super().validate_keep(config_dict, keep)
        groups = self.expert_groups(config_dict, keep)
        if groups is not None and not groups[1]:
            n_group, size = groups[0], self.num_experts(config_dict) // groups[0]
            raise MoePruneError(
                f"cannot keep {keep} experts per layer with group-limited routing (n_group={n_group} groups of "
                f"{size}): expected a multiple of the kept groups with at least 2 per group; {self.notes}"
            )

    def check_routing_rules(self, config_dict, drop_map, physical):
        e, (n_group, _) = self.num_experts(config_dict), self._groups(config_dict)
        size = e // n_group
        shapes = set()
        for layer, dropped in drop_map.items():
            per_group = [size - sum(1 for i in dropped if i // size == g) for g in range(n_group)]
            why = self._legal(config_dict, per_group)
            if why:
                raise MoePruneError(f"drop map layer {layer} is illegal for group-limited routing: {why}. {self.notes}")
            shapes.add(sum(1 for x in per_group if x))
        if physical and len(shapes) > 1:
            raise MoePruneError(f"layers keep experts in {sorted(shapes)} groups: a checkpoint has one n_group. {self.notes}")

    def pruned_config(self, config_dict, drop_map):
        out = super().pruned_config(config_dict, drop_map)
        e, (n_group, _) = self.num_experts(config_dict), self._groups(config_dict)
        size = e // n_group
        dropped = set(next(iter(drop_map.values()), []))  # validated: every layer drops as many groups
        whole = sum(1 for g in range(n_group) if set(range(g * size, (g + 1) * size)) <= dropped)
        self.text_config(out)["n_group"] = n_group - whole
        return out

    @contextlib.contextmanager
    def mask_experts(self, block, dropped):
        with minus_inf_bias(block.router.e_score_correction_bias, dropped):
            yield


ADAPTERS.register("deepseek_v3")(
    DeepseekV3Adapter(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        expert_axis_tensors={**MLP_EXPERT_TENSORS, "mlp.gate.e_score_correction_bias": 0},
        per_expert_pattern=MLP_PER_EXPERT,
        shared_down_tensors=("mlp.shared_experts.down_proj.weight",),
        num_experts_key="n_routed_experts",
        extra_expert_count_keys=("num_local_experts",),
        mtp_config_keys=("num_nextn_predict_layers",),  # the MTP head is decoder layer num_hidden_layers
        notes=("Legal DeepSeek-V3 prunes keep the same number (>= 2) of experts in every group of "
               "n_group consecutive ids, or drop whole groups (n_group shrinks); see docs/architectures.md"),
    )
)
