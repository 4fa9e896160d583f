"""What doppel's training needs from FSDP beyond accelerate's launcher config.

accelerate (1.15) shards the final norm and the LM head as one FSDP2 unit. TRL's fused LM head reads
`lm_head.weight` without calling `lm_head`, so that unit's forward never "completes". torch 2.13 completes
it at the end of the root's forward; earlier torch (seen with 2.11 on an H100) only resets it in backward.
After an evaluation (a forward with no backward) the unit then never unshards again, and once a
checkpoint's state dict has put its weights back in shards, the next training step fails with "got mixed
torch.Tensor and DTensor" in the final norm or the embedding.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


def complete_forwards(model: Any) -> None:
    """Mark every FSDP2 unit's forward finished, as backward does."""
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        pending = getattr(state, "_modules_to_run_forward", None)
        if pending:
            pending.clear()


class CompleteForwardsAfterEval(TrainerCallback):
    """After each evaluation, let the next training forward unshard every unit again."""

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            complete_forwards(model)
