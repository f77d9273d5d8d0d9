"""Virtual pruning applies prune.shared_ffn_alpha in memory exactly as surgery writes it, and puts
the loaded model back afterwards."""

from __future__ import annotations

from pathlib import Path

import torch

from moeprune.dropmap import VirtualPrune
from moeprune.evaluate.backends.hf import HFBackend
from moeprune.prune.surgery import prune_checkpoint
from moeprune.toy import world

TOY = Path(world.__file__).parent / "model"
# 8 of 16 experts kept in every MoE layer of the shipped toy model
DROP = {layer: list(range(layer % 2, 16, 2)) for layer in range(4)}


def prompts() -> list[str]:
    return [t.prompt for c in world.CLASSES for t in world.make_tasks(c, 4, "test", 0)]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_virtual_alpha_gives_the_greedy_outputs_of_the_physical_checkpoint_with_that_alpha(tmp_path):
    prune_checkpoint(TOY, tmp_path / "pruned", DROP, shared_ffn_alpha=1.2)
    physical = HFBackend(tmp_path / "pruned", device="cpu").generate(prompts(), world.MAX_NEW_TOKENS)

    virtual = HFBackend(TOY, device="cpu", virtual=VirtualPrune(DROP, 1.2))
    before = state(virtual.model)
    got = virtual.generate(prompts(), world.MAX_NEW_TOKENS)
    assert [c.text for c in got] == [c.text for c in physical]
    after = state(virtual.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the loaded model must be restored"

    # Greedy answers barely move at 1.2 on 24 prompts, so the logits show that alpha was applied.
    # Gemma 4 normalizes the shared FFN's output (post_feedforward_layernorm_1), so what alpha
    # changes is the rounding of the scaled bfloat16 weights: the float32 load must round as well.
    pruned = HFBackend(tmp_path / "pruned", device="cpu")
    plain = HFBackend(TOY, device="cpu", virtual=VirtualPrune(DROP), model=virtual.model, tokenizer=virtual.tokenizer)
    ids = virtual.tokenizer(prompts(), return_tensors="pt", padding=True)
    with torch.no_grad():
        want = pruned.model(**ids).logits
        with virtual._routing():
            scaled = virtual.model(**ids).logits
        with plain._routing():
            unscaled = plain.model(**ids).logits
    real = ids["attention_mask"].bool()  # left padding: the padded positions are not compared
    # masking 8 experts vs removing them sums in another order: ~4e-5 apart, alpha moves ~0.5
    torch.testing.assert_close(scaled[real], want[real], rtol=1e-4, atol=2e-4)
    assert (scaled - unscaled)[real].abs().max() > 1e-1
    assert plain.identity() != virtual.identity()  # another alpha, another generation cache key
