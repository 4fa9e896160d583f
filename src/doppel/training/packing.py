"""Training rows: tokenized, masked sessions, packed into full-length rows, and their collator.

Packed sessions never attend to each other: each row carries `position_ids` that restart at 0 for
every session and no 2D attention mask, so transformers builds a block-diagonal causal mask
(sdpa/eager) or varlen boundaries (flash attention) from them, and doppel's varlen (attention.py) its
per-session spans. The first label of every session is -100 (its `<|im_start|>` header), so no loss
crosses a boundary either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppel.dataset import Dataset as DoppelDataset
from doppel.dataset import Split
from doppel.render import IGNORE

if TYPE_CHECKING:
    from doppel.memory.index import Memory
    from doppel.records import Session


def tokenized(dataset: DoppelDataset, split: Split, tokenizer: Any, max_length: int, memory: Memory | None = None,
              memory_tokens: int = 0) -> Any:
    """A `datasets.Dataset` of `input_ids`/`labels` windows, one or more per session; with a `memory`, each trained
    turn is predicted after the memory block chat would recall before it (memory/recall.py): for training sessions,
    from the training sessions that ended before the session; for held-out ones, from any session that did."""
    from datasets import Dataset

    from doppel.render import encode

    ids: list[list[int]] = []
    labels: list[list[int]] = []
    sessions = list(dataset.sessions(split))
    for session, blocks in zip(sessions, memory_blocks(sessions, split, tokenizer, memory, memory_tokens),
                               strict=True):
        for sample_ids, sample_labels in encode(session, tokenizer, max_length, blocks=blocks):
            ids.append(sample_ids)
            labels.append(sample_labels)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def memory_blocks(sessions: list[Session], split: Split, tokenizer: Any, memory: Memory | None,
                  memory_tokens: int) -> list[list[list[int]] | None]:
    """Each session's memory block ids before each of its turns as training gives them (None without a
    `memory`); the preference step (tuning/preferences.py) opens its prompts with the same."""
    from doppel.memory.recall import for_turns

    if memory is None:
        return [None for _ in sessions]
    return [[ids for ids, _ in turns] for turns in
            for_turns(memory, sessions, tokenizer, memory_tokens, {"train"} if split == "train" else None)]


def cached(path: Path, build: Any) -> Any:
    """Load the dataset saved at `path`, or build it and save it there."""
    from datasets import load_from_disk

    if path.is_dir():
        return load_from_disk(str(path))
    data = build()
    data.save_to_disk(str(path))
    return data


def rows(samples: Any, max_length: int, packing: bool) -> Any:
    """Best-fit-decreasing packing of samples into rows of at most `max_length` tokens."""
    if not packing or len(samples) == 0:
        return samples
    from trl import pack_dataset

    return pack_dataset(samples, max_length, strategy="bfd")


def count_targets(samples: Any) -> int:
    return sum(sum(1 for label in row if label != IGNORE) for row in samples["labels"])


@dataclass
class Collator:
    """Pads rows to the longest in the batch; positions restart at each packed session.

    `flatten` (for flash attention and doppel's varlen) joins the batch's rows into one row instead: flash
    attention finds packed sessions from restarting positions only in a batch of one row (transformers then
    runs the varlen kernel, one causal span per session); with several rows it would let a row's sessions
    see each other. varlen would cope with several rows, but one row spares it the padding to the longest.
    sdpa and eager need no flattening: restarting positions give them a block-diagonal mask.

    Records the real and target tokens of each training batch it builds (while `counting`), for the
    tokens/s figures; batch i of the list is the i-th batch the trainer consumes.
    """

    pad_id: int
    pad_to_multiple_of: int = 8
    flatten: bool = False
    batches: list[tuple[int, int]] = field(default_factory=list, init=False)
    counting: bool = field(default=True, init=False)

    def consumed(self, batches: int) -> tuple[int, int]:
        """(tokens, targets) in the first `batches` recorded batches."""
        done = self.batches[:batches]
        return sum(t for t, _ in done), sum(t for _, t in done)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.flatten:
            batch = [{"input_ids": [i for row in batch for i in row["input_ids"]],
                      "labels": [label for row in batch for label in row["labels"]],
                      "seq_lengths": [n for row in batch for n in row.get("seq_lengths", [len(row["input_ids"])])]}]
        longest = max(len(row["input_ids"]) for row in batch)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            # the padding tail is a sequence of its own, so that it never looks like a continuation
            lengths = [*row.get("seq_lengths", [n]), width - n]
            positions[i] = torch.cat([torch.arange(length) for length in lengths if length])
        if self.counting:
            self.batches.append((sum(len(row["input_ids"]) for row in batch), int((labels != IGNORE).sum())))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
