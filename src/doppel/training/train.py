"""`train(cfg)`: fine-tune a chat model on a sessions dataset with TRL's SFTTrainer.

One linear function for every setup: CPU, one GPU, or many under `accelerate launch` with FSDP.
LoRA, QLoRA and full fine-tuning differ only where the model is prepared. What is decided for this machine
(device, precision, attention, rows, optimizer, checkpointing) is the run's `Plan` (training/plan.py),
resolved once before anything is written.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doppel import config
from doppel.config import TrainConfig
from doppel.dataset import STATS_FILE, Dataset
from doppel.errors import RunError, TrainError
from doppel.run import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, RUN_FILE, TOKENS, Run, RunInfo
from doppel.run import STATS_FILE as RUN_STATS_FILE
from doppel.training.attention import VARLEN
from doppel.training.plan import Plan, out_of_memory, plan, take_over_fsdp_checkpointing

__all__ = ["TrainConfig", "TrainError", "train"]


def train(dataset_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, callbacks: Sequence[Any] = (),
          save: bool = True) -> RunInfo:
    """Train, save the adapter or weights with the tokenizer in `run_dir`, and return the run's info.

    With `cfg.resume`, an unfinished run goes on from its last complete checkpoint, and a finished one trains on
    to a larger `max_steps` or `epochs` from its last checkpoint. `save=False` (benchmarks) skips the final
    weights; the run is then not marked finished.
    """
    import torch

    from doppel import models

    dataset = _dataset(Path(dataset_dir))
    run = Run(run_dir)
    checkpoint, extending = _start(run, cfg)
    how = plan(cfg, models.parameter_count(cfg.model))
    take_over_fsdp_checkpointing(how)
    if extending and int(os.environ.get("RANK", "0")) == 0:
        (run.path / RUN_FILE).unlink()  # unfinished until the new budget is done; only now nothing can refuse it
    fresh = not (run.path.exists() and any(run.path.iterdir()))
    try:
        return _train(dataset, run, cfg, how, checkpoint, callbacks, save)
    except BaseException as exc:
        kept = run.checkpoints
        if fresh and not kept and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(run.path, ignore_errors=True)  # nothing worth resuming: the same command can run again
        if isinstance(exc, torch.cuda.OutOfMemoryError):  # while training: the model itself fitted
            raise TrainError(out_of_memory(cfg, how, True, run.path / CHECKPOINTS if kept else None)) from None
        raise


def _train(dataset: Dataset, run: Run, cfg: TrainConfig, how: Plan, checkpoint: Path | None,
           callbacks: Sequence[Any], save: bool) -> RunInfo:
    import torch
    from peft.helpers import disable_input_dtype_casting
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from doppel import models
    from doppel.training import metrics, packing
    from doppel.training.loss import Trainer

    set_seed(cfg.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    memory = _memory(cfg, dataset)
    args = _arguments(cfg, how, run.path)
    with args.main_process_first(desc="tokenizing"):
        run.path.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, run.path / CONFIG_FILE)
        shutil.copyfile(dataset.path / STATS_FILE, run.path / RUN_STATS_FILE)
        data = {split: packing.rows(packing.cached(
            run.path / TOKENS / split, lambda s=split: packing.tokenized(dataset, s, tokenizer, cfg.max_length, memory,
                                                   cfg.memory_budget)),
            cfg.max_length, cfg.packing) for split in ("train", "eval")}
    if args.process_index == 0:  # one process rewrites the log
        if checkpoint is not None:
            metrics.truncate(run.path / METRICS_FILE, int(checkpoint.name.split("-")[-1]))
        else:
            (run.path / METRICS_FILE).write_text("", encoding="utf-8")
    try:
        model = _model(cfg, how, tokenizer, args.local_process_index)
    except torch.cuda.OutOfMemoryError:
        raise TrainError(out_of_memory(cfg, how, False, None)) from None
    if not len(data["eval"]):
        args.eval_strategy = "no"
    collator = packing.Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                else tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                flatten=how.attention.startswith("flash_attention") or how.attention == VARLEN)
    # on CPU the loss projects only the target positions (training/loss.py); on a GPU it is TRL's fused LM head
    trainer = Trainer(model=model, args=args, train_dataset=data["train"],
                      eval_dataset=data["eval"] if len(data["eval"]) else None,
                      processing_class=tokenizer, data_collator=collator, compact_loss=not how.cuda)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(metrics.TrainLog(run.path / METRICS_FILE, collator, args.world_size,
                                          cfg.gradient_accumulation))
    if trainer.is_fsdp_enabled:
        from doppel.training.fsdp import CompleteForwardsAfterEval

        trainer.add_callback(CompleteForwardsAfterEval())
    for callback in callbacks:
        trainer.add_callback(callback)
    # bf16 on CPU: peft casts each adapter's input up to the adapter's fp32, and autocast casts it straight back
    # down for the matmul; without the round trip a step takes 4% less time and the losses move by about 0.1%
    # (docs/benchmarks.md). Not measured on a GPU yet, so not done there.
    with disable_input_dtype_casting(model, active=how.bf16 and not how.cuda):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    logged = run.metrics()
    # the whole run's mean (transformers' own counts only this process's steps); an older run's log cannot say
    train_loss = metrics.train_loss(logged) or result.training_loss
    stats = dataset.stats
    info = RunInfo(cfg.model, cfg.mode, trainer.state.global_step, round(trainer.state.epoch or 0.0, 4), train_loss,
                   next((r["eval_loss"] for r in reversed(logged) if "eval_loss" in r), None),
                   str(dataset.path.resolve()), stats.owner_id, stats.owner_name, how.attention, how.precision,
                   args.world_size, str(trainer.accelerator.distributed_type).split(".")[-1].lower(),
                   time.strftime("%Y-%m-%dT%H:%M:%S%z"), how.to_json(), cfg.memory_budget if memory else None)
    if save:
        _save(trainer, tokenizer, run, info)
    return info


def _dataset(path: Path) -> Dataset:
    dataset = Dataset.open(path)
    if not dataset.stats.train_sessions:
        raise TrainError(f"{path} has no training sessions; check doppel inspect {path}")
    dataset.check()  # a damaged line is refused now, not after the model is loaded
    return dataset


def _memory(cfg: TrainConfig, dataset: Dataset) -> Any:
    """The dataset's memory index when the run trains with memory, else None."""
    from doppel.memory.index import Memory

    if cfg.memory == "off" or (cfg.memory == "auto" and dataset.memory_path is None):
        return None
    if dataset.memory_path is None:
        raise TrainError(f"{dataset.path} has no memory index (it was prepared with --no-memory or by an older "
                         "doppel); prepare it again, or train with --memory off")
    return Memory.open(dataset.memory_path)


def _start(run: Run, cfg: TrainConfig) -> tuple[Path | None, bool]:
    """(the checkpoint to go on from, None for a new run; whether a finished run trains on to a larger budget).
    Never writes over anything it was not told to resume, and changes nothing: the caller marks an extended run
    unfinished once nothing else can refuse it."""
    extending = run.finished
    if extending:
        if not cfg.resume:
            raise TrainError(f"{run.path} already holds a finished run; choose another out, or resume it with a "
                             "larger max_steps or epochs to train it further")
        _check_extension(run, cfg)
    elif not cfg.resume:
        if run.path.exists() and any(run.path.iterdir()):
            raise TrainError(f"{run.path} is not empty; resume to continue the run there, or choose another out")
        return None, False
    try:
        return run.last_checkpoint(), extending
    except RunError as exc:
        raise TrainError(str(exc)) from None


def _check_extension(run: Run, cfg: TrainConfig) -> None:
    """Check that a finished run has more to do under `cfg`, from a checkpoint of its last step."""
    done = run.info
    more = cfg.max_steps > done.steps if cfg.max_steps is not None else cfg.epochs > done.epochs
    if not more:
        budget = f"max_steps {cfg.max_steps}" if cfg.max_steps is not None else f"epochs {cfg.epochs:g}"
        raise TrainError(f"{run.path} has already trained {done.steps} steps ({done.epochs:g} epochs): nothing more "
                         f"to do with {budget}; give a larger max_steps or epochs")
    if not run.checkpoints or int(run.checkpoints[-1].name.split("-")[-1]) != done.steps:
        raise TrainError(f"{run.path} kept no checkpoint of its last step ({done.steps}), so it cannot train on; "
                         "start a new run with the budget you want")


def _arguments(cfg: TrainConfig, how: Plan, run_dir: Path) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(run_dir / CHECKPOINTS), per_device_train_batch_size=how.rows,
        per_device_eval_batch_size=how.rows, gradient_accumulation_steps=cfg.gradient_accumulation,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, bf16=how.bf16,
        seed=cfg.seed, logging_steps=cfg.logging_steps, logging_first_step=True, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="steps", eval_steps=cfg.eval_steps or cfg.save_steps,
        report_to=list(cfg.report_to) or "none", disable_tqdm=True, use_liger_kernel=cfg.liger,
        # without packing, batches of similar lengths waste less on padding
        train_sampling_strategy="random" if cfg.packing else "group_by_length",
        # TRL reads the old name, transformers the new one
        gradient_checkpointing=how.checkpointing, activation_checkpointing=how.checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=cfg.max_length, packing=False, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=not how.cuda, optim=how.optimizer)


def _model(cfg: TrainConfig, how: Plan, tokenizer: Any, process: int) -> Any:
    """The base model prepared for the mode: LoRA adapters, 4-bit base + adapters, or all weights."""
    import torch

    from doppel import models
    from doppel.training.attention import register

    if how.attention == VARLEN:
        register()
    # bf16 weights as TRL stores them: the frozen base of lora/qlora, and on a GPU every weight of a full
    # fine-tune (to fit; AdamW's small updates are then rounded to bf16). A full fine-tune on CPU keeps fp32
    # weights and computes in bf16 under autocast.
    dtype = torch.bfloat16 if how.bf16 and (how.cuda or cfg.mode != "full") else torch.float32
    model = models.load_model(cfg.model, dtype=dtype, attention=how.attention, quantize_4bit=cfg.mode == "qlora",
                              device_map={"": process} if cfg.mode == "qlora" and how.cuda else None)
    new_tokens = models.fit_embeddings(model, tokenizer)
    model.config.use_cache = False
    if cfg.mode == "full":
        return model
    from peft import LoraConfig, get_peft_model

    # QLoRA: no peft.prepare_model_for_kbit_training. It casts the embeddings, the LM head and the norms to fp32,
    # which makes the whole residual stream fp32 and doubles the activations that checkpointing keeps; TRL dropped
    # that cast after finding the same losses with less memory (huggingface/trl#4457). The rest of it (freezing the
    # base, input gradients for checkpointing) get_peft_model and the trainer do, as for LoRA.
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM",
                      # added ChatML tokens start untrained, so the embeddings and the head train too (peft's
                      # trainable_token_indices would be lighter, but TRL's fused LM head reads the unwrapped weight)
                      modules_to_save=["embed_tokens", "lm_head"] if new_tokens else None,
                      ensure_weight_tying=bool(new_tokens) and bool(model.config.tie_word_embeddings))
    return get_peft_model(model, lora)


def _save(trainer: Any, tokenizer: Any, run: Run, info: RunInfo) -> None:
    """Final weights into the run dir; `run.json`, written last, marks the run finished."""
    from doppel.models import move_into

    staging = run.path / ".final"
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(staging))
        move_into(staging, run.path)
        run.write_info(info)
    trainer.accelerator.wait_for_everyone()
