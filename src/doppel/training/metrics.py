"""What a training run reports: a progress bar with loss, tokens/s and ETA on stderr, one line per
logging step on stdout when stderr is not a terminal, and one JSON line per log in `metrics.jsonl`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from doppel.run import read_metrics
from doppel.training.packing import Collator


def train_loss(rows: list[dict[str, Any]]) -> float | None:
    """The mean training loss over all the steps the rows cover, each row's loss weighted by the steps it averages.
    transformers' own train_loss counts only the steps this process ran: a resumed run's last stretch."""
    logged = [row for row in rows if "loss" in row]
    if any("loss_steps" not in row for row in logged):
        return None  # a run logged by an older doppel: its rows do not say how many steps they cover
    steps = sum(row["loss_steps"] for row in logged)
    return sum(row["loss"] * row["loss_steps"] for row in logged) / steps if steps else None


def truncate(path: Path, last_step: int) -> None:
    """Forget logs after `last_step` (a resumed run logs those steps again)."""
    kept = [row for row in read_metrics(path) if row["step"] <= last_step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")


class TrainLog(TrainerCallback):
    """Progress bar and metrics; only the main process reports.

    Training time leaves out evaluations and checkpoints; tokens are those of the batches the
    optimizer steps consumed (the collator records them, and stops while an evaluation runs).
    """

    def __init__(self, path: Path, collator: Collator, processes: int, accumulation: int) -> None:
        self.path = path
        self.collator = collator
        self.processes = processes
        self.accumulation = accumulation
        self.start = self.last_step = time.perf_counter()
        self.first_step = 0
        self.logged_step = 0  # where the window of the next logged loss starts
        self.paused = 0.0
        self.mark = (0.0, 0, 0)  # (train seconds, tokens, targets) at the last log line
        self.base = self.mark  # the same at the start (a resumed run's checkpoint)
        self.progress: Any = None
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = self.last_step = time.perf_counter()
        self.first_step = self.logged_step = state.global_step
        # a resumed run goes on counting from its checkpoint (the log was cut back to it)
        done = [row for row in read_metrics(self.path) if "tokens" in row] if self.first_step else []
        self.mark = (done[-1]["train_seconds"], done[-1]["tokens"], done[-1]["target_tokens"]) if done else (0.0, 0, 0)
        self.base = self.mark
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        console = Console(stderr=True)
        if console.is_terminal:  # otherwise log lines only
            self.progress = Progress("training", BarColumn(), MofNCompleteColumn(), "{task.fields[loss]}",
                                     "{task.fields[speed]}", TimeRemainingColumn(), console=console,
                                     transient=True)
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               loss="", speed="")
            self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_step = time.perf_counter()
        if state.global_step >= state.max_steps and args.eval_strategy != "no":
            control.should_evaluate = True  # every run ends with its held-out loss
        # a loss row at every checkpoint and at the end: the rows a resume keeps cover exactly the steps before it
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        if control.should_evaluate:
            self.collator.counting = False
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def _pause(self) -> None:
        now = time.perf_counter()
        self.paused += now - self.last_step
        self.last_step = now
        self.collator.counting = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pause()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pause()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            seconds = self.base[0] + self.last_step - self.start - self.paused
            consumed = self.collator.consumed((state.global_step - self.first_step) * self.accumulation)
            tokens, targets = (base + n * self.processes for base, n in zip(self.base[1:], consumed, strict=True))
            span = max(seconds - self.mark[0], 1e-9)
            # transformers' loss is the mean over the steps since its last log (or since the resumed checkpoint)
            row.update(loss=logs["loss"], loss_steps=state.global_step - self.logged_step,
                       learning_rate=logs.get("learning_rate"),
                       tokens_per_s=round((tokens - self.mark[1]) / span, 1),
                       target_tokens_per_s=round((targets - self.mark[2]) / span, 1),
                       tokens=tokens, target_tokens=targets, train_seconds=round(seconds, 4))
            self.mark = (seconds, tokens, targets)
            self.logged_step = state.global_step
        elif "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
        else:
            return
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
        self._show(row, state.max_steps)

    def _show(self, row: dict[str, Any], total: int) -> None:
        if "loss" in row:
            line = (f"step {row['step']}/{total}  loss {row['loss']:.4f}  lr {row['learning_rate']:.2e}  "
                    f"{row['tokens_per_s']:,.0f} tok/s")
        else:
            line = f"step {row['step']}/{total}  eval_loss {row['eval_loss']:.4f}"
        if self.progress is None:
            print(line, flush=True)
            return
        if "loss" in row:
            self.progress.update(self.task, loss=f"loss {row['loss']:.3f}", speed=f"{row['tokens_per_s']:,.0f} tok/s")
        self.progress.console.print(line, highlight=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
