"""The training loss on CPU: the LM head only where the next token is a target.

TRL's SFTTrainer scores every position through its chunked, fused LM head and also works out each
position's entropy and top-1 hit for its metrics. On a GPU its Triton kernel scores only the target
positions and never holds the full logits. On CPU it scores every position (headers and context turns
too) in pure PyTorch, and that took 46% of a training step of the embedded model (docs/benchmarks.md).
Here the model's own forward projects only the positions whose next token is a target
(`logits_to_keep`) and the loss is PyTorch's cross-entropy over them: the same loss and gradients,
normalised as TRL normalises them. Entropy and token accuracy, which doppel does not log, are not
computed.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from doppel.render import IGNORE


def target_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
    """Summed cross-entropy of the target tokens over `num_items_in_batch` (default: the targets here)."""
    import torch
    from torch.nn.functional import cross_entropy

    next_labels = inputs["labels"][:, 1:]
    # positions whose next token is a target in some row (a micro-batch on CPU is one row by default)
    keep = (next_labels != IGNORE).any(dim=0).nonzero().flatten()
    features = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**features, use_cache=False, logits_to_keep=keep).logits
    targets = next_labels[:, keep]
    total = cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    count = (targets != IGNORE).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


class Trainer(SFTTrainer):
    """SFTTrainer with `target_loss` where TRL's fused LM head has no kernel (CPU); TRL's own elsewhere."""

    def __init__(self, *args: Any, compact_loss: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compact_loss = compact_loss

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if (not self.compact_loss or return_outputs or self.aux_loss_enabled
                or self.compute_loss_func is not None or self.label_smoother is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = target_loss(model, inputs, num_items_in_batch)
        # as TRL and `Trainer`: `num_items_in_batch` counts every rank's tokens, and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss
